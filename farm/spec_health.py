"""Shared routing state in Redis, so every API process sees the same: per-spec failure back-off, and queue depths.

Back-off: the control plane records a spec's failures (a worker-side retryable failure, a worker that died with the
job); each failure sets `until = now + BackoffPolicy.delay_s(failures)` in one hash that the API reads (cached for
`_BACKOFF_CACHE_S`) and `farm.routing.route_request` honours. Queue depths (LLEN of `infer.<spec>`) are read only
when a model's replicas are all saturated, and cached for `_DEPTH_CACHE_S`.
"""

from __future__ import annotations

import logging
import time

from farm import queues, redis_keys
from farm.redis_client import async_redis, sync_redis
from farm.routing import BACKOFF_POLICY, BackoffPolicy
from farm.single_flight import SingleFlight

log = logging.getLogger(__name__)

_BACKOFF_CACHE_S = 0.5
_DEPTH_CACHE_S = 0.25
# How long one cause (a dead worker) counts as a single failure of a spec, however many of its jobs are requeued.
CAUSE_WINDOW_S = 60

_backoffs: tuple[float, dict[str, float]] = (0.0, {})
_depths: dict[str, tuple[float, int]] = {}
_backoff_reads = SingleFlight()
_depth_reads = SingleFlight()


def spec_failure_record(
    *,
    spec: str,
    reason: str,
    cause: str | None = None,
    now: float | None = None,
    policy: BackoffPolicy = BACKOFF_POLICY,
) -> float:
    """Counts one failure of `spec` and backs it off for the policy's delay; returns the epoch it ends at.

    Failures that share a `cause` (the jobs of one dead worker) count once per `CAUSE_WINDOW_S`: a worker that dies
    holding 20 jobs is one failure of its spec, not 20 (which would back the spec off for the policy's maximum)."""
    now = time.time() if now is None else now
    client = sync_redis()
    if cause is not None and not client.set(redis_keys.spec_failure_cause(spec, cause), 1, nx=True, ex=CAUSE_WINDOW_S):
        until = float(client.hget(redis_keys.SPEC_BACKOFF, spec) or now)
        log.info("spec %s failed (%s): cause %s already counted", spec, reason, cause)
        return until
    counter = redis_keys.spec_failures(spec)
    with client.pipeline(transaction=True) as pipe:
        pipe.incr(counter)
        pipe.expire(counter, int(policy.reset_after_s))
        failures = int(pipe.execute()[0])
    until = now + policy.delay_s(failures)
    client.hset(redis_keys.SPEC_BACKOFF, spec, until)
    log.warning("spec %s failed (%s): failure %d, backed off for %.1fs", spec, reason, failures, until - now)
    return until


def spec_backoff_clear(*, spec: str | None = None) -> None:
    """Forgets a spec's failures (or every spec's): an operator fixed it."""
    client = sync_redis()
    causes = list(client.scan_iter(match=redis_keys.spec_failure_cause(spec or "*", "*"), count=1000))
    if spec is None:
        names = [name.decode() for name in client.hkeys(redis_keys.SPEC_BACKOFF)]
        client.delete(redis_keys.SPEC_BACKOFF, *[redis_keys.spec_failures(name) for name in names], *causes)
    else:
        client.hdel(redis_keys.SPEC_BACKOFF, spec)
        client.delete(redis_keys.spec_failures(spec), *causes)
    backoffs_invalidate()


def spec_backoffs_sync() -> dict[str, float]:
    """spec -> back-off end (epoch seconds), for the control plane."""
    raw = sync_redis().hgetall(redis_keys.SPEC_BACKOFF)
    return {name.decode(): float(until) for name, until in raw.items()}


async def spec_backoffs() -> dict[str, float]:
    """spec -> back-off end (epoch seconds); one HGETALL per process every `_BACKOFF_CACHE_S`, shared by the
    requests that find it expired."""
    expires, values = _backoffs
    if expires > time.monotonic():
        return values
    return await _backoff_reads.run(None, _backoffs_read, store=_keep_backoffs)


async def _backoffs_read() -> dict[str, float]:
    raw = await async_redis().hgetall(redis_keys.SPEC_BACKOFF)
    return {name.decode(): float(until) for name, until in raw.items()}


def _keep_backoffs(values: dict[str, float]) -> None:
    global _backoffs
    _backoffs = (time.monotonic() + _BACKOFF_CACHE_S, values)


def backoffs_invalidate() -> None:
    global _backoffs
    _backoffs = (0.0, {})
    _backoff_reads.forget()  # reads begun before the change do not enter the caches
    _depth_reads.forget()
    _depths.clear()


async def queue_depths(specs: list[str]) -> dict[str, int]:
    """Messages waiting in each spec's `infer.<spec>` queue (Celery's Redis list), cached briefly per spec; the
    requests that find the same depths expired share one read."""
    now = time.monotonic()
    cached = {spec: _depths[spec][1] for spec in specs if spec in _depths and _depths[spec][0] > now}
    missing = tuple(sorted(spec for spec in specs if spec not in cached))
    if missing:
        cached |= await _depth_reads.run(missing, lambda: _depths_read(missing), store=_keep_depths)
    return {spec: cached[spec] for spec in specs}


async def _depths_read(specs: tuple[str, ...]) -> dict[str, int]:
    async with async_redis().pipeline(transaction=False) as pipe:
        for spec in specs:
            pipe.llen(queues.infer_queue(spec))
        return dict(zip(specs, map(int, await pipe.execute()), strict=True))


def _keep_depths(lengths: dict[str, int]) -> None:
    expires = time.monotonic() + _DEPTH_CACHE_S
    _depths.update((spec, (expires, length)) for spec, length in lengths.items())


def queue_depths_sync(specs: list[str]) -> dict[str, int]:
    """Uncached queue depths, for the control plane and metrics."""
    with sync_redis().pipeline(transaction=False) as pipe:
        for spec in specs:
            pipe.llen(queues.infer_queue(spec))
        return {spec: int(length) for spec, length in zip(specs, pipe.execute(), strict=True)}
