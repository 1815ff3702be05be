"""The worker process's runtime: engine host, event publisher, claims, cancellation, draining, quarantine and
live load figures. Built once by `gpu_workers.__main__` before Celery starts; task threads reach it via `current()`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
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
    consecutive_failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def begin(self) -> None:
        with self._lock:
            self.running += 1

    def end(self, outcome: Outcome, *, worker_fault: bool) -> int:
        """Records an outcome; returns the run of consecutive worker-side failures."""
        with self._lock:
            self.running -= 1
            self.tokens += outcome.completion_tokens
            if outcome.status == "succeeded":
                self.completed += 1
                self.consecutive_failures = 0
            elif worker_fault:
                self.failed += 1
                self.consecutive_failures += 1
            return self.consecutive_failures

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"running": self.running, "completed": self.completed, "failed": self.failed, "tokens": self.tokens,
                    "consecutive_failures": self.consecutive_failures}


@dataclass
class _InFlight:
    attempt: int
    future: concurrent.futures.Future | None = None
    stop_reason: str | None = None  # "canceled" or "handback" once asked to stop


class WorkerRuntime:
    def __init__(self, *, worker_id: str, redis_url: str, host: EngineHost, events: JobEventPublisher,
                 quarantine_after: int = 5) -> None:
        self.worker_id = worker_id
        self.host = host
        self.events = events
        self.redis = redis.Redis.from_url(redis_url)
        self.stats = LoadStats()
        self.status = "ready"  # ready | draining | quarantined
        self.quarantine_after = quarantine_after
        self.on_quarantine: Callable[[], None] | None = None
        self._inflight: dict[str, _InFlight] = {}
        self._lock = threading.Lock()

    # --- claims and lifecycle -------------------------------------------------------------------------------

    def claim(self, message: InferenceMessage) -> bool:
        """Atomically takes this job attempt; a redelivered or republished copy finds it taken."""
        key = redis_keys.job_claim(message.job_id, message.attempt)
        return bool(self.redis.set(key, self.worker_id, nx=True, ex=CLAIM_TTL_S))

    def run_inference(self, message: InferenceMessage) -> Outcome | None:
        """Runs one job attempt to an outcome and reports it; None when another delivery already owns it."""
        if not self.claim(message):
            log.info("job %s attempt %d already claimed: duplicate delivery ignored", message.job_id, message.attempt)
            return None
        send = self.events.send
        if self.redis.exists(redis_keys.job_cancel(message.job_id)):
            log.info("job %s was canceled before it started", message.job_id)
            return Outcome(status="canceled")
        if self.status != "ready":  # draining or quarantined: hand it straight back
            send(job_id=message.job_id, attempt=message.attempt, kind="requeue", reason=f"worker {self.status}")
            return Outcome(status="requeue")
        if message.deadline <= time.time():
            failure = Failure(504, "timeout_error", "deadline_exceeded", "The job expired before it could start.")
            self.host.run(write_failure(self.host.redis, message.job_id, failure))
            send(job_id=message.job_id, attempt=message.attempt, kind="timed_out",
                 error={"code": failure.code, "message": failure.message})
            return Outcome(status="timed_out")

        self.stats.begin()
        with self._lock:
            self._inflight[message.job_id] = _InFlight(attempt=message.attempt)
        send(job_id=message.job_id, attempt=message.attempt, kind="running")
        outcome = Outcome(status="failed", error={"code": "internal_error", "message": "worker error", "retry": True})
        try:
            outcome = self._generate(message)
        finally:
            with self._lock:
                self._inflight.pop(message.job_id, None)
            worker_fault = outcome.status == "failed" and bool((outcome.error or {}).get("retry"))
            if self.stats.end(outcome, worker_fault=worker_fault) >= self.quarantine_after:
                self.quarantine()
            if outcome.status == "requeue":
                send(job_id=message.job_id, attempt=message.attempt, kind="requeue", reason="worker shutting down")
            elif outcome.status != "canceled":  # a cancel was already recorded by whoever canceled
                send(job_id=message.job_id, attempt=message.attempt, kind=outcome.status, **outcome.event_detail())
        return outcome

    def _generate(self, message: InferenceMessage) -> Outcome:
        engine = self.host.engine(message.spec)
        if engine is None:
            return Outcome(status="failed", error={"code": "spec_not_loaded", "retry": True,
                                                   "message": f"{message.spec} is not loaded on {self.worker_id}"})
        try:
            prepared = prepare(engine, message)
        except EngineInputError as exc:
            failure, outcome = input_error_outcome(exc)
            self.host.run(write_failure(self.host.redis, message.job_id, failure))
            return outcome
        future = self.host.submit(stream_generation(
            writer=self.host.writer, engine=engine, job_id=message.job_id, attempt=message.attempt, prepared=prepared,
            deadline=message.deadline,
        ))
        with self._lock:
            entry = self._inflight[message.job_id]
            entry.future = future
            if entry.stop_reason:  # asked to stop while we were preparing
                future.cancel()
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            reason = entry.stop_reason or "canceled"
            log.info("job %s attempt %d stopped: %s", message.job_id, message.attempt, reason)
            return Outcome(status="requeue" if reason == "handback" else "canceled")
        except Exception as exc:  # engine crash, broker hiccup: transient, the control plane retries elsewhere
            log.exception("job %s failed in the engine", message.job_id)
            return Outcome(status="failed", error={"code": "engine_error", "retry": True,
                                                   "message": f"{exc.__class__.__name__}: {exc}"})

    # --- stopping work ----------------------------------------------------------------------------------------

    def stop_job(self, job_id: str, reason: str) -> bool:
        """Aborts a running job's engine request (frees its KV cache). Thread-safe; True if it was running here."""
        with self._lock:
            entry = self._inflight.get(job_id)
            if entry is None:
                return False
            entry.stop_reason = entry.stop_reason or reason
            future = entry.future
        if future is not None:
            future.cancel()
        return True

    def running_jobs(self) -> list[str]:
        with self._lock:
            return list(self._inflight)

    def drain(self, grace_s: float) -> None:
        """Stops taking work; jobs still running after `grace_s` are aborted and handed back to the queue."""
        self.status = "draining"

        def hand_back() -> None:
            deadline = time.monotonic() + grace_s
            while self.running_jobs() and time.monotonic() < deadline:
                time.sleep(0.1)
            for job_id in self.running_jobs():
                self.stop_job(job_id, "handback")

        threading.Thread(target=hand_back, name="drain", daemon=True).start()

    def quarantine(self) -> None:
        if self.status == "ready":
            log.error("%d consecutive failures: quarantining %s (stops consuming, reports unhealthy)",
                      self.stats.consecutive_failures, self.worker_id)
            self.status = "quarantined"
            if self.on_quarantine is not None:
                self.on_quarantine()

    async def listen_for_cancellations(self) -> None:
        """Runs on the engine loop: a cancel published by the control plane aborts the job here within a second."""
        while True:
            try:
                pubsub = self.host.redis.pubsub()
                await pubsub.subscribe(redis_keys.CANCEL_CHANNEL)
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        job_id = message["data"].decode()
                        if self.stop_job(job_id, "canceled"):
                            log.info("job %s canceled: engine request aborted", job_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis restart: resubscribe
                log.warning("cancel listener lost Redis (%s); resubscribing", exc)
                await asyncio.sleep(1.0)


_current: WorkerRuntime | None = None


def install(runtime: WorkerRuntime) -> None:
    global _current
    _current = runtime


def current() -> WorkerRuntime:
    if _current is None:
        raise RuntimeError("no worker runtime: start workers with `python -m gpu_workers`")
    return _current
