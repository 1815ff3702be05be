"""Thin Celery task entry points: they take ids and JSON, call one function, and carry retry/failure wiring."""
