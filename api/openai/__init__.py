"""OpenAI-compatible endpoints, one package per OpenAI family (schema beside view)."""
