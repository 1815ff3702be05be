"""The control plane's Celery app (`celery -A farm.celery worker -Q control`), Django-enabled."""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings.django")

from farm.celery_app import create_celery_app
from settings import env

app = create_celery_app(broker_url=env.REDIS_URL, main="farm-control", reap_every_s=env.FARM_REAP_EVERY_S)
app.conf.include = ["tasks.control"]

# Celery's Django fixup closes every database connection of the task's thread before and after each task unless
# CELERY_DB_REUSE_MAX is set (celery 5.7, `DjangoWorkerFixup.close_database`): a new PostgreSQL connection per
# control message, the largest single cost of a job event under load (BENCHMARKS.md, 2026-12-02 afternoon). The
# fixup now closes them only every 2 x this many tasks; before each task they are checked the way Django checks
# them before each request (`close_old_connections`: CONN_MAX_AGE, and a broken connection is replaced).
app.conf.CELERY_DB_REUSE_MAX = 10_000


def _check_database_connections(**_: Any) -> None:
    from django.db import close_old_connections

    close_old_connections()


def _connect_signals() -> None:
    from celery.signals import task_prerun

    task_prerun.connect(_check_database_connections, weak=False, dispatch_uid="farm-database-connections")


_connect_signals()
