"""Publishing jobs to their queues. Called only after the job row is committed."""

from __future__ import annotations

from typing import Any

from farm import queues


def inference_publish(*, job_id: str, attempt: int, spec: str, kind: str, request: dict[str, Any],
                      deadline: float, countdown: float = 0.0) -> None:
    """Sends the inference task to `infer.<spec>` (after `countdown` seconds, for retry backoff)."""
    from farm.celery import app

    app.send_task(
        queues.INFER_TASK.name,
        kwargs={"job_id": job_id, "attempt": attempt, "spec": spec, "kind": kind, "request": request,
                "deadline": deadline},
        queue=queues.infer_queue(spec),
        countdown=countdown or None,
        retry=True,
        retry_policy={"max_retries": 2, "interval_start": 0.05, "interval_step": 0.2, "interval_max": 0.5},
    )
