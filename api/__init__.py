"""HTTP faces of the farm: OpenAI-compatible `/v1/*`, farm resources `/api/*`, health, auth and errors."""
