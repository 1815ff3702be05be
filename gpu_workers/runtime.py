"""The worker process's runtime: engine host, event publisher, claims, cancellation, draining, quarantine and
live load figures. Built once by `gpu_workers.__main__` before Celery starts. The queue consumer runs attempts on
the engine loop (`run_claimed`); Celery task threads, where they take the messages, reach it via `current()`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.exceptions import RedisError

from farm import redis_keys
from farm.redis_client import redis_connect
from farm.stream_format import Failure
from gpu_workers.adapters import AdapterCache
from gpu_workers.engine import Engine, EngineInputError
from gpu_workers.engine_host import EngineHost
from gpu_workers.engine_pool import EnginePool, NoRoom, SpecLoadFailed
from gpu_workers.inference import (
    InferenceMessage,
    Outcome,
    TokenCount,
    input_error_outcome,
    prepare,
    stream_generation,
    write_failure,
)
from gpu_workers.job_events import JobEventPublisher

log = logging.getLogger(__name__)

# A claim outlives any redelivery window of the broker (visibility timeout), so a duplicate always loses.
CLAIM_TTL_S = 2 * 3600
# Window over which the heartbeat's `tokens_per_s` is measured.
TOKEN_RATE_WINDOW_S = 30.0
# How long a request for a spec that does not fit beside the busy ones waits for room before it is handed back.
ROOM_WAIT_S = 30.0
# An attempt's outcome when the worker itself broke before the engine could say more.
_WORKER_ERROR = Outcome(status="failed", error={"code": "internal_error", "message": "worker error", "retry": True})


@dataclass
class LoadStats:
    """Live figures advertised in the heartbeat."""

    running: int = 0
    completed: int = 0
    failed: int = 0
    tokens: int = 0
    consecutive_failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _token_samples: deque[tuple[float, int]] = field(default_factory=deque, repr=False)

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

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """The figures, with `tokens_per_s`: completion tokens finished over the last `TOKEN_RATE_WINDOW_S`
        (measured between snapshots, which the heartbeat takes every few seconds)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            samples = self._token_samples
            samples.append((now, self.tokens))
            while len(samples) > 2 and samples[1][0] <= now - TOKEN_RATE_WINDOW_S:
                samples.popleft()
            first_at, first_tokens = samples[0]
            rate = (self.tokens - first_tokens) / (now - first_at) if now > first_at else 0.0
            return {
                "running": self.running,
                "completed": self.completed,
                "failed": self.failed,
                "tokens": self.tokens,
                "consecutive_failures": self.consecutive_failures,
                "tokens_per_s": round(rate, 2),
            }

    def reset_failures(self) -> None:
        with self._lock:
            self.consecutive_failures = 0


class ClaimFailed(Exception):
    """The claim's round trip to Redis failed: nothing ran and nothing was reported, so the message goes back to its
    queue (`tasks.inference`) instead of being acked and lost."""


@dataclass
class _InFlight:
    attempt: int
    cancel: Callable[[], object] | None = None  # stops the attempt's generation (thread-safe)
    stop_reason: str | None = None  # "canceled" or "handback" once asked to stop

    def stop(self) -> None:
        if self.cancel is not None:
            self.cancel()


class WorkerRuntime:
    def __init__(
        self,
        *,
        worker_id: str,
        redis_url: str,
        host: EngineHost,
        events: JobEventPublisher,
        quarantine_after: int = 5,
        engines: EnginePool | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.host = host
        self.engines = engines or EnginePool(
            configs={}, need_bytes={}, budget_bytes=0, load=host.load, unload=lambda name, _: host.unload(name)
        )
        self.events = events
        self.redis = redis_connect(redis_url)
        self.stats = LoadStats()
        self.status = "ready"  # ready | draining | quarantined
        self.quarantine_after = quarantine_after
        # Hooks set by `gpu_workers.__main__`: stop / start consuming this worker's queues.
        self.on_quarantine: Callable[[], None] | None = None
        self.on_resume: Callable[[], None] | None = None
        self._shutting_down = False
        # Keyed by (job id, attempt): a requeued job's next attempt may land here while the previous one is still
        # being stopped, and the first to end must not unlist the other (the reaper would requeue it again).
        self._inflight: dict[tuple[str, int], _InFlight] = {}
        self._lock = threading.Lock()

    # --- claims and lifecycle -------------------------------------------------------------------------------

    def claim(self, message: InferenceMessage) -> bool:
        """Atomically takes this job attempt; a redelivered or republished copy finds it taken."""
        return self.claim_unless_canceled(message)[0]

    def claim_unless_canceled(self, message: InferenceMessage) -> tuple[bool, bool]:
        """`claim`, and whether the job was canceled meanwhile, in one round trip: (claimed, canceled)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(redis_keys.job_claim(message.job_id, message.attempt), self.worker_id, nx=True, ex=CLAIM_TTL_S)
            pipe.exists(redis_keys.job_cancel(message.job_id))
            claimed, canceled = pipe.execute()
        return bool(claimed), bool(canceled)

    def run_inference(self, message: InferenceMessage) -> Outcome | None:
        """Runs one job attempt to an outcome and reports it, from a Celery task thread; None when another delivery
        already owns it. Raises `ClaimFailed` when Redis could not be asked (after `farm.redis_client`'s reconnect
        attempts). `gpu_workers.queue_consumer` runs the same steps on the engine loop (`run_claimed`)."""
        try:
            claimed, canceled = self.claim_unless_canceled(message)
        except RedisError as exc:
            raise ClaimFailed(f"job {message.job_id} attempt {message.attempt}: claim failed: {exc!r}") from exc
        if not claimed:
            log.info("job %s attempt %d already claimed: duplicate delivery ignored", message.job_id, message.attempt)
            return None
        early, failure = self._before_start(message, canceled=canceled)
        if failure is not None:
            self.host.run(write_failure(self.host.writer, message.job_id, failure))
        if early is not None:
            return early
        self._started(message)
        outcome = _WORKER_ERROR
        try:
            outcome = self._generate(message)
        finally:
            self._finished(message, outcome)
        return outcome

    async def run_claimed(self, message: InferenceMessage, *, claimed: bool, canceled: bool) -> Outcome | None:
        """`run_inference` on the engine loop, for an attempt whose claim the caller made (`claim_unless_canceled`'s
        two answers). A loaded spec runs here without a thread; a spec to load, or an adapter to fetch, blocks and
        goes to a thread (`_generate`)."""
        if not claimed:
            log.info("job %s attempt %d already claimed: duplicate delivery ignored", message.job_id, message.attempt)
            return None
        early, failure = self._before_start(message, canceled=canceled)
        if failure is not None:
            await write_failure(self.host.writer, message.job_id, failure)
        if early is not None:
            return early
        entry = self._started(message)
        outcome = _WORKER_ERROR
        try:
            engine = self.engines.take_loaded(message.spec) if self.engines.knows(message.spec) else None
            if engine is None:  # unknown here, or to be loaded first: a load blocks, so it waits in a thread
                engine = await asyncio.to_thread(self._engine_for, message)
            if isinstance(engine, Outcome):
                outcome = engine
            else:
                try:
                    outcome = await self._generate_here(engine, message, entry)
                finally:
                    self.engines.release(message.spec)
        finally:
            self._finished(message, outcome)
        return outcome

    def _before_start(self, message: InferenceMessage, *, canceled: bool) -> tuple[Outcome | None, Failure | None]:
        """The outcome of a claimed attempt that must not start (canceled, this worker not ready, deadline passed),
        with the failure to end its stream with; (None, None) when it may start. Never blocks."""
        if canceled:
            log.info("job %s was canceled before it started", message.job_id)
            return Outcome(status="canceled"), None
        if self.status != "ready":  # draining or quarantined: hand it straight back
            self.events.send(
                job_id=message.job_id, attempt=message.attempt, kind="requeue", reason=f"worker {self.status}"
            )
            return Outcome(status="requeue"), None
        if message.deadline <= time.time():
            failure = Failure(504, "timeout_error", "deadline_exceeded", "The job expired before it could start.")
            self.events.send(
                job_id=message.job_id,
                attempt=message.attempt,
                kind="timed_out",
                error={"code": failure.code, "message": failure.message},
            )
            return Outcome(status="timed_out"), failure
        return None, None

    def _started(self, message: InferenceMessage) -> _InFlight:
        self.stats.begin()
        entry = _InFlight(attempt=message.attempt)
        with self._lock:
            self._inflight[(message.job_id, message.attempt)] = entry
        self.events.send(job_id=message.job_id, attempt=message.attempt, kind="running")
        return entry

    def _finished(self, message: InferenceMessage, outcome: Outcome) -> None:
        """Unlists the attempt, counts its outcome (quarantining after too many worker faults) and reports it."""
        send = self.events.send
        with self._lock:
            self._inflight.pop((message.job_id, message.attempt), None)
        # A spec that fails to load is the spec's fault (bad args, missing weights), not this worker's: it is
        # backed off, and must not quarantine a worker that serves its other specs well.
        error = outcome.error or {}
        worker_fault = (
            outcome.status == "failed" and bool(error.get("retry")) and error.get("code") != "spec_load_failed"
        )
        if self.stats.end(outcome, worker_fault=worker_fault) >= self.quarantine_after:
            self.quarantine()
        if outcome.status == "requeue":
            reason = (outcome.error or {}).get("message") or "worker shutting down"
            send(job_id=message.job_id, attempt=message.attempt, kind="requeue", reason=reason)
        elif outcome.status != "canceled":  # a cancel was already recorded by whoever canceled
            send(job_id=message.job_id, attempt=message.attempt, kind=outcome.status, **outcome.event_detail())
        elif outcome.prompt_tokens:  # what the engine did before the abort still counts (`farm.jobs`)
            send(job_id=message.job_id, attempt=message.attempt, kind="usage", usage=outcome.event_detail()["usage"])

    def _generate(self, message: InferenceMessage) -> Outcome:
        """Runs the attempt on its spec's engine, loading the spec first if this worker loads it on demand. Blocks:
        a task thread's path, never the engine loop's."""
        engine = self._engine_for(message)
        if isinstance(engine, Outcome):
            return engine
        try:
            return self._generate_on(engine, message)
        finally:
            self.engines.release(message.spec)

    def _engine_for(self, message: InferenceMessage) -> Engine | Outcome:
        """The attempt's engine, held (`EnginePool.release` it), loaded first if this worker loads the spec on
        demand; or the outcome of an attempt that cannot run here. Blocks while a load runs or room is awaited."""
        if not self.engines.knows(message.spec):
            return Outcome(
                status="failed",
                error={
                    "code": "spec_not_loaded",
                    "retry": True,
                    "message": f"{message.spec} is not served by {self.worker_id}",
                },
            )
        wait_s = max(0.0, min(ROOM_WAIT_S, message.deadline - time.time()))
        try:
            return self.engines.take(message.spec, wait_s=wait_s)
        except NoRoom as exc:  # every other spec here is busy: another worker (or this one, later) takes it
            log.warning("job %s handed back: %s", message.job_id, exc)
            return Outcome(status="requeue", error={"code": "no_room", "message": str(exc)})
        except SpecLoadFailed as exc:  # the control plane backs the spec off and retries the job elsewhere
            return Outcome(status="failed", error={"code": "spec_load_failed", "retry": True, "message": str(exc)})

    def _generate_on(self, engine: Engine, message: InferenceMessage) -> Outcome:
        try:
            prepared = prepare(engine, message)
            if message.adapter is not None:  # a fine-tuned model: its LoRA adapter over this spec's base
                prepared = self.adapters.attach(engine, prepared, job_id=message.job_id, adapter=message.adapter)
        except EngineInputError as exc:
            failure, outcome = input_error_outcome(exc)
            self.host.run(write_failure(self.host.writer, message.job_id, failure))
            return outcome
        counted = TokenCount()
        future = self.host.submit(self._stream(engine, message, prepared, counted))
        with self._lock:
            entry = self._inflight[(message.job_id, message.attempt)]
            entry.cancel = future.cancel
            if entry.stop_reason:  # asked to stop while we were preparing
                future.cancel()
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            return self._stopped(message, entry, counted)
        except Exception as exc:  # engine crash, broker hiccup: transient, the control plane retries elsewhere
            return self._engine_failed(message, exc)

    async def _generate_here(self, engine: Engine, message: InferenceMessage, entry: _InFlight) -> Outcome:
        """`_generate_on` on the engine loop itself: no thread, no hop (but for an adapter to fetch)."""
        try:
            prepared = prepare(engine, message)
            if message.adapter is not None:  # may download it from the API first: in a thread
                prepared = await asyncio.to_thread(
                    self.adapters.attach, engine, prepared, job_id=message.job_id, adapter=message.adapter
                )
        except EngineInputError as exc:
            failure, outcome = input_error_outcome(exc)
            await write_failure(self.host.writer, message.job_id, failure)
            return outcome
        counted = TokenCount()
        task = asyncio.ensure_future(self._stream(engine, message, prepared, counted))
        loop = asyncio.get_running_loop()
        with self._lock:
            entry.cancel = lambda: loop.call_soon_threadsafe(task.cancel)
            if entry.stop_reason:  # asked to stop before the generation began
                task.cancel()
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():  # this coroutine itself is being cancelled
                raise
            return self._stopped(message, entry, counted)
        except Exception as exc:
            return self._engine_failed(message, exc)

    def _stream(self, engine: Engine, message: InferenceMessage, prepared: Any, counted: TokenCount) -> Any:
        return stream_generation(
            writer=self.host.writer,
            engine=engine,
            job_id=message.job_id,
            attempt=message.attempt,
            prepared=prepared,
            deadline=message.deadline,
            counted=counted,
            whole_text=message.whole_text,
        )

    @staticmethod
    def _stopped(message: InferenceMessage, entry: _InFlight, counted: TokenCount) -> Outcome:
        """The outcome of an attempt whose generation `stop_job` cancelled."""
        reason = entry.stop_reason or "canceled"
        log.info("job %s attempt %d stopped: %s", message.job_id, message.attempt, reason)
        if reason == "handback":
            return Outcome(status="requeue")
        return Outcome(
            status="canceled", prompt_tokens=counted.prompt_tokens, completion_tokens=counted.completion_tokens
        )

    @staticmethod
    def _engine_failed(message: InferenceMessage, exc: Exception) -> Outcome:
        """Engine crash, broker hiccup: transient, the control plane retries the job elsewhere."""
        log.error("job %s failed in the engine", message.job_id, exc_info=exc)
        return Outcome(
            status="failed",
            error={"code": "engine_error", "retry": True, "message": f"{exc.__class__.__name__}: {exc}"},
        )

    @property
    def adapters(self) -> AdapterCache:
        """The LoRA adapter cache (made on first use: most workers never serve a fine-tuned model)."""
        cache = getattr(self, "_adapters", None)
        if cache is None:
            from gpu_workers import envs

            cache = self._adapters = AdapterCache(api_url=envs.FARM_API_URL, directory=envs.FARM_ADAPTER_DIR)
        return cache

    # --- stopping work ----------------------------------------------------------------------------------------

    def stop_job(self, job_id: str, reason: str) -> bool:
        """Aborts a running job's engine requests, every attempt of it here (frees their KV cache). Thread-safe;
        True if it was running here."""
        with self._lock:
            entries = [entry for (running_id, _), entry in self._inflight.items() if running_id == job_id]
            for entry in entries:
                entry.stop_reason = entry.stop_reason or reason
        for entry in entries:
            entry.stop()
        return bool(entries)

    def running_jobs(self) -> list[str]:
        with self._lock:
            return sorted({job_id for job_id, _ in self._inflight})

    def drain(self, grace_s: float) -> None:
        """Stops taking work; jobs still running after `grace_s` are aborted and handed back to the queue. Once:
        a second call changes nothing."""
        if self._shutting_down:
            return
        self._shutting_down = True
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
            log.error(
                "%d consecutive failures: quarantining %s (stops consuming, reports unhealthy)",
                self.stats.consecutive_failures,
                self.worker_id,
            )
            self.status = "quarantined"
            if self.on_quarantine is not None:
                self.on_quarantine()

    def apply_control(self, action: str) -> bool:
        """An operator's command (admin action, via `farm.worker_control`). `drain`: stop taking work and let the
        running jobs finish; `quarantine`: stop taking work and report unhealthy; `resume`: take work again.
        Returns whether the status changed; the next heartbeat reports it."""
        before = self.status
        if action in ("drain", "quarantine"):
            target = "draining" if action == "drain" else "quarantined"
            if before == target:
                return False
            self.status = target
            if before == "ready" and self.on_quarantine is not None:  # both stop consuming; running jobs go on
                self.on_quarantine()
        elif action == "resume":
            if before == "ready" or self._shutting_down:
                return False
            self.stats.reset_failures()
            self.status = "ready"
            if self.on_resume is not None:
                self.on_resume()
        else:
            log.warning("unknown worker control action %r ignored", action)
            return False
        log.warning("operator action %s: %s is now %s (was %s)", action, self.worker_id, self.status, before)
        return True

    async def listen_for_control(self) -> None:
        """Runs on the engine loop: drain/quarantine/resume commands addressed to this worker."""
        while True:
            try:
                pubsub = self.host.redis.pubsub()
                await pubsub.subscribe(redis_keys.WORKER_CONTROL_CHANNEL)
                async for message in pubsub.listen():
                    if message["type"] != "message":
                        continue
                    try:
                        command = orjson.loads(message["data"])
                    except orjson.JSONDecodeError:
                        log.warning("malformed worker control message ignored: %r", message["data"][:200])
                        continue
                    if command.get("worker_id") == self.worker_id:
                        # Off the loop: the hooks broadcast to Celery (blocking calls).
                        await asyncio.to_thread(self.apply_control, str(command.get("action")))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis restart: resubscribe
                log.warning("control listener lost Redis (%s); resubscribing", exc)
                await asyncio.sleep(1.0)

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
