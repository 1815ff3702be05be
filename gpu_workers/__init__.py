"""Inference workers: the only package allowed to import vLLM / torch / transformers."""
