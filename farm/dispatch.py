"""Publishing jobs to their queues. Called only after the job row is committed."""

from __future__ import annotations

import functools
from typing import Any

from farm import queues
from farm.task_messages import task_push

# Publishing retries for about 8 s (0.1 + 0.4 + 0.7 + 1 s x 7) before the caller is told the broker is down: a broker
# restart (a second or two) then delays the requests that arrive meanwhile instead of failing them.
PUBLISH_RETRY_POLICY = {"max_retries": 10, "interval_start": 0.1, "interval_step": 0.3, "interval_max": 1.0}


def inference_adapter(*, job_id: str, attempt: int, name: str, lora_id: int, file_id: str) -> dict[str, Any]:
    """What a worker needs to serve a fine-tuned model: the adapter's name and id, and this attempt's token to fetch
    it through the API (`GET /api/jobs/<id>/adapter`)."""
    from farm.job_tokens import job_token_mint

    return {
        "name": name,
        "lora_id": lora_id,
        "file_id": file_id,
        "token": job_token_mint(job_id=job_id, attempt=attempt),
    }


def inference_publish(
    *,
    job_id: str,
    attempt: int,
    spec: str,
    kind: str,
    request: dict[str, Any],
    deadline: float,
    countdown: float = 0.0,
    adapter: dict[str, Any] | None = None,
    stream_tokens: bool = True,
) -> None:
    """Sends the inference task to `infer.<spec>` (after `countdown` seconds, for retry backoff).
    `stream_tokens=False` when nobody reads the job's tokens as they come (batch lines): the worker then writes
    only the outcome, which saves a Redis write and an engine output per token."""
    kwargs: dict[str, Any] = {
        "job_id": job_id,
        "attempt": attempt,
        "spec": spec,
        "kind": kind,
        "request": request,
        "deadline": deadline,
    }
    if adapter is not None:
        kwargs["adapter"] = adapter
    if not stream_tokens:
        kwargs["stream_tokens"] = False
    # What Flower and the logs show of the message; Celery's own repr of the request costs ~0.2 ms per publish.
    kwargsrepr = f"{{'job_id': '{job_id}', 'attempt': {attempt}, 'spec': '{spec}'}}"
    if not countdown and _redis_broker():  # the request path: the message pushed as Celery would push it
        task_push(task=queues.INFER_TASK.name, queue=queues.infer_queue(spec), kwargs=kwargs, kwargsrepr=kwargsrepr)
        return
    from farm.celery import app

    app.send_task(
        queues.INFER_TASK.name,
        kwargs=kwargs,
        argsrepr="()",
        kwargsrepr=kwargsrepr,
        queue=queues.infer_queue(spec),
        countdown=countdown or None,
        retry=True,
        retry_policy=PUBLISH_RETRY_POLICY,
    )


@functools.cache
def _redis_broker() -> bool:
    from settings import env

    return env.REDIS_URL.split("://", 1)[0] in ("redis", "rediss")
