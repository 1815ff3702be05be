"""Job events a worker reports to the control plane (started, finished, failed) as Celery messages.

The control worker persists them (`tasks.control.job_events` -> `farm.jobs.job_apply_events`); workers never touch
the database. Events sent within `window_s` of each other travel as one message, applied in order: under load (a
batch starting 200 lines at once) one Celery message per event made the control worker the farm's bottleneck. An
event waits at most `window_s` (50 ms) plus a publish. The control worker applies a message's starts and successes
in bulk (`farm.job_events`: ~8 ms of CPU for a message of one job, ~1 ms per job for eight on the dev VM), so the
window is as long as a client never notices: its tokens and outcome travel through Redis, not through these events;
only the job's row (`GET /v1/jobs/<id>`, the admin) catches up that much later.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import Celery

from farm import queues

log = logging.getLogger(__name__)

_RETRY_POLICY = {"max_retries": 20, "interval_start": 0.1, "interval_step": 0.5, "interval_max": 3}
# A message carries at most this many events (a few hundred bytes each).
MAX_EVENTS_PER_MESSAGE = 500


class JobEventPublisher:
    """Thread-safe. `send` never blocks on the broker; a background thread publishes, retrying through broker
    outages without dropping or reordering events. `flush` publishes what is pending now (at shutdown)."""

    def __init__(
        self, app: Celery, worker_id: str, *, window_s: float = 0.05, queue: str = queues.CONTROL_QUEUE
    ) -> None:
        self._app = app
        self._worker_id = worker_id
        self._queue = queue
        self._window_s = window_s
        self._pending: list[dict[str, Any]] = []
        self._ready = threading.Condition()
        self._publishing = threading.Lock()  # one publisher at a time: messages leave in the order events came
        self._thread: threading.Thread | None = None

    def send(self, *, job_id: str, attempt: int, kind: str, **detail: Any) -> None:
        """Queues one event for the next message."""
        event = {"job_id": job_id, "attempt": attempt, "kind": kind, "worker_id": self._worker_id, "detail": detail}
        with self._ready:
            self._pending.append(event)
            self._ready.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="job-events", daemon=True)
                self._thread.start()

    def flush(self) -> None:
        """Publishes every pending event now; raises if the broker stays unreachable (the events stay pending)."""
        with self._publishing:
            with self._ready:
                events, self._pending = self._pending, []
            sent = 0
            try:
                while sent < len(events):
                    self._publish(events[sent : sent + MAX_EVENTS_PER_MESSAGE])
                    sent += MAX_EVENTS_PER_MESSAGE
            except Exception:
                with self._ready:  # back in front, in order: the next flush sends them first
                    self._pending = events[sent:] + self._pending
                raise

    def _publish(self, events: list[dict[str, Any]]) -> None:
        self._app.send_task(
            queues.JOB_EVENTS_TASK.name,
            kwargs={"events": events},
            # Celery would otherwise repr the whole event list for Flower (up to 1 KiB, walked in Python).
            argsrepr="()",
            kwargsrepr=f"{{'events': <{len(events)} from {self._worker_id}>}}",
            queue=self._queue,
            retry=True,
            retry_policy=_RETRY_POLICY,
        )

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._pending:
                    self._ready.wait()
            time.sleep(self._window_s)  # the events of the same moment (a batch's lines) join this message
            try:
                self.flush()
            except Exception:
                log.warning("job events not published yet (broker unreachable); retrying", exc_info=True)
                time.sleep(1.0)
