"""The farm's domain: data model, services (jobs, keys, routing, registry), admin and the Celery app.

This package's top level stays import-light: workers import `farm.queues` and `farm.redis_keys` without Django.
"""
