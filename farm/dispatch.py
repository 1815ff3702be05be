"""Publishing jobs to their queues. Called only after the job row is committed."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from farm import queues
from farm.job_streams import job_streams_open, opening_ids
from farm.redis_client import sync_redis
from farm.request_ids import request_id_bound
from farm.task_messages import task_message, task_push_many

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


@dataclass(frozen=True)
class InferenceTask:
    """One attempt of an inference job, as its worker receives it (`gpu_workers.inference.InferenceMessage`).
    `stream_tokens=False` when nobody reads the job's tokens as they come (batch lines): the worker then writes
    only the outcome, which saves a Redis write and an engine output per token."""

    job_id: str
    attempt: int
    spec: str
    kind: str
    request: dict[str, Any]
    deadline: float
    adapter: dict[str, Any] | None = None
    stream_tokens: bool = True
    request_id: str | None = None  # the request id its message carries; None: the one bound now

    def kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "job_id": self.job_id,
            "attempt": self.attempt,
            "spec": self.spec,
            "kind": self.kind,
            "request": self.request,
            "deadline": self.deadline,
        }
        if self.adapter is not None:
            kwargs["adapter"] = self.adapter
        if not self.stream_tokens:
            kwargs["stream_tokens"] = False
        return kwargs

    def kwargsrepr(self) -> str:
        """What Flower and the logs show of the message; Celery's own repr of the request costs ~0.2 ms."""
        return f"{{'job_id': '{self.job_id}', 'attempt': {self.attempt}, 'spec': '{self.spec}'}}"


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
    """Sends the inference task to `infer.<spec>` (after `countdown` seconds, for retry backoff)."""
    task = InferenceTask(job_id, attempt, spec, kind, request, deadline, adapter, stream_tokens)
    if countdown:
        _send_through_celery(task, countdown=countdown)
    else:
        inference_publish_now([task])


def inference_publish_now(tasks: Sequence[InferenceTask], *, open_streams: bool = False) -> list[bytes]:
    """Sends the tasks to their `infer.<spec>` queues now. On a Redis broker (the request path) their messages are
    pushed as Celery would push them, all in one round trip (`farm.task_messages`); on another broker, by Celery.

    `open_streams` (new jobs): each job's stream gets its opening entry first (`job_streams_open`), on a Redis
    broker in the same round trip, ahead of the messages: a worker's first write must find it there, and a separate
    round trip cost the API 0.06-0.15 ms per request (BENCHMARKS.md, 2026-12-07 morning). Returns the opening
    entries' ids, one per task (none without `open_streams`)."""
    opening = [(task.job_id, task.deadline) for task in tasks] if open_streams else []
    if not _redis_broker():
        opened = (job_streams_open(opening) or []) if opening else []
        for task in tasks:
            _send_through_celery(task)
        return opened
    messages = []
    for task in tasks:
        queue = queues.infer_queue(task.spec)
        message = task_message(
            task=queues.INFER_TASK.name,
            queue=queue,
            kwargs=task.kwargs(),
            kwargsrepr=task.kwargsrepr(),
            request_id=task.request_id,
        )
        messages.append((queue, message))
    with sync_redis().pipeline(transaction=False) as pipe:
        if opening:
            job_streams_open(opening, pipe=pipe)
        task_push_many(messages, pipe=pipe)
        return opening_ids(pipe.execute(), len(opening))


def _send_through_celery(task: InferenceTask, *, countdown: float = 0.0) -> None:
    from farm.celery import app

    with request_id_bound(task.request_id) if task.request_id is not None else contextlib.nullcontext():
        app.send_task(
            queues.INFER_TASK.name,
            kwargs=task.kwargs(),
            argsrepr="()",
            kwargsrepr=task.kwargsrepr(),
            queue=queues.infer_queue(task.spec),
            countdown=countdown or None,
            retry=True,
            retry_policy=PUBLISH_RETRY_POLICY,
        )


@functools.cache
def _redis_broker() -> bool:
    from farm.celery_app import is_redis_url
    from settings import env

    return is_redis_url(env.REDIS_URL)  # the broker URL `farm.celery` gives Celery
