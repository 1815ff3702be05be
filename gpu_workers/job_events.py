"""Job events a worker reports to the control plane (started, finished, failed) as Celery messages.

The control worker persists them (`tasks.control.job_event` -> `farm.jobs.job_apply_event`); workers never touch
the database.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from farm import queues

log = logging.getLogger(__name__)

_RETRY_POLICY = {"max_retries": 20, "interval_start": 0.1, "interval_step": 0.5, "interval_max": 3}


class JobEventPublisher:
    def __init__(self, app: Celery, worker_id: str) -> None:
        self._app = app
        self._worker_id = worker_id

    def send(self, *, job_id: str, attempt: int, kind: str, **detail: Any) -> None:
        """Publishes one event; retries through a broker hiccup instead of dropping it."""
        self._app.send_task(
            queues.JOB_EVENT_TASK.name,
            kwargs={"job_id": job_id, "attempt": attempt, "kind": kind, "worker_id": self._worker_id, "detail": detail},
            queue=queues.CONTROL_QUEUE,
            retry=True,
            retry_policy=_RETRY_POLICY,
        )
