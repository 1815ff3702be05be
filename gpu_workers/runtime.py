"""The worker process's runtime: engine host, event publisher, claims and live load figures.

Built once by `gpu_workers.__main__` before Celery starts; task threads reach it through `current()`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from farm import redis_keys
from farm.stream_format import Failure
from gpu_workers.engine import EngineInputError
from gpu_workers.engine_host import EngineHost
from gpu_workers.inference import (
    InferenceMessage,
    Outcome,
    input_error_outcome,
    prepare,
    stream_generation,
    write_failure,
)
from gpu_workers.job_events import JobEventPublisher

log = logging.getLogger(__name__)

# A claim outlives any redelivery window of the broker (visibility timeout), so a duplicate always loses.
CLAIM_TTL_S = 2 * 3600


@dataclass
class LoadStats:
    """Live figures advertised in the heartbeat."""

    running: int = 0
    completed: int = 0
    failed: int = 0
    tokens: int = 0
    started_at: float = field(default_factory=time.time)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def begin(self) -> None:
        with self._lock:
            self.running += 1

    def end(self, outcome: Outcome) -> None:
        with self._lock:
            self.running -= 1
            self.tokens += outcome.completion_tokens
            if outcome.status == "succeeded":
                self.completed += 1
            else:
                self.failed += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"running": self.running, "completed": self.completed, "failed": self.failed, "tokens": self.tokens}


class WorkerRuntime:
    def __init__(self, *, worker_id: str, redis_url: str, host: EngineHost, events: JobEventPublisher) -> None:
        self.worker_id = worker_id
        self.host = host
        self.events = events
        self.redis = redis.Redis.from_url(redis_url)
        self.stats = LoadStats()

    def claim(self, message: InferenceMessage) -> bool:
        """Atomically takes this job attempt; a redelivered or republished copy finds it taken."""
        key = redis_keys.job_claim(message.job_id, message.attempt)
        return bool(self.redis.set(key, self.worker_id, nx=True, ex=CLAIM_TTL_S))

    def run_inference(self, message: InferenceMessage) -> Outcome | None:
        """Runs one job to a terminal outcome and reports it; None when another delivery already owns it."""
        if not self.claim(message):
            log.info("job %s attempt %d already claimed: duplicate delivery ignored", message.job_id, message.attempt)
            return None
        self.stats.begin()
        self.events.send(job_id=message.job_id, attempt=message.attempt, kind="running")
        outcome = Outcome(status="failed", error={"code": "internal_error", "message": "worker error"})
        try:
            outcome = self._generate(message)
        finally:
            self.stats.end(outcome)
            self.events.send(
                job_id=message.job_id, attempt=message.attempt, kind=outcome.status, **outcome.event_detail()
            )
        return outcome

    def _generate(self, message: InferenceMessage) -> Outcome:
        engine = self.host.engine(message.spec)
        if engine is None:
            failure = Failure(503, "service_unavailable", "spec_not_loaded", f"{message.spec} is not loaded here")
            self.host.run(write_failure(self.host.redis, message.job_id, failure))
            return Outcome(status="failed", error={"code": failure.code, "message": failure.message, "retry": True})
        try:
            prepared = prepare(engine, message)
        except EngineInputError as exc:
            failure, outcome = input_error_outcome(exc)
            self.host.run(write_failure(self.host.redis, message.job_id, failure))
            return outcome
        try:
            return self.host.run(
                stream_generation(
                    redis=self.host.redis, engine=engine, job_id=message.job_id, prepared=prepared,
                    deadline=message.deadline,
                )
            )
        except Exception as exc:
            log.exception("job %s failed in the engine", message.job_id)
            failure = Failure(500, "server_error", "engine_error", f"The engine failed: {exc.__class__.__name__}")
            self.host.run(write_failure(self.host.redis, message.job_id, failure))
            return Outcome(status="failed", error={"code": failure.code, "message": str(exc), "retry": True})


_current: WorkerRuntime | None = None


def install(runtime: WorkerRuntime) -> None:
    global _current
    _current = runtime


def current() -> WorkerRuntime:
    if _current is None:
        raise RuntimeError("no worker runtime: start workers with `python -m gpu_workers`")
    return _current
