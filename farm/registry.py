"""The live worker registry, read from Redis (workers write it with their heartbeats)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson

from farm import redis_keys
from farm.redis_client import async_redis, sync_redis

log = logging.getLogger(__name__)

_SNAPSHOT_S = 1.0


@dataclass(frozen=True)
class LiveWorker:
    worker_id: str
    specs: tuple[str, ...]  # loaded: serving now
    running: int
    capacity: int
    status: str  # ready | draining | quarantined
    running_jobs: frozenset[str]
    raw: dict[str, Any]
    seen_at: float = 0.0  # epoch seconds of its last heartbeat
    heartbeat_s: float = 0.0  # its heartbeat interval (0: an older worker that does not say)
    lazy_specs: tuple[str, ...] = ()  # not loaded; loaded on the first request for them (a cold start)

    @property
    def accepts_work(self) -> bool:
        return self.status == "ready"

    def fresh(self, now: float) -> bool:
        """False once three heartbeats (and at least 5 s) were missed: routing stops sending work before a long TTL
        ends, without taking a worker whose heartbeat thread is briefly starved on a loaded host for dead."""
        return self.heartbeat_s <= 0 or now - self.seen_at <= max(3 * self.heartbeat_s, 5.0)


def _parse(values: list[bytes | None]) -> list[LiveWorker]:
    workers = []
    for value in values:
        if value is None:  # expired: the worker went silent
            continue
        entry = orjson.loads(value)
        load = entry.get("load", {})
        workers.append(
            LiveWorker(
                worker_id=entry["worker_id"],
                specs=tuple(entry.get("specs", ())),
                running=load.get("running", 0),
                capacity=load.get("capacity", 1),
                status=entry.get("status", "ready"),
                running_jobs=frozenset(entry.get("running_jobs", ())),
                raw=entry,
                seen_at=float(entry.get("ts", 0.0)),
                heartbeat_s=float(entry.get("heartbeat_s", 0.0)),
                lazy_specs=tuple(entry.get("lazy_specs", ())),
            )
        )
    return workers


_snapshot: tuple[float, list[LiveWorker], dict[str, list[LiveWorker]]] = (0.0, [], {})


def workers_by_spec(workers: list[LiveWorker]) -> dict[str, list[LiveWorker]]:
    """spec -> the workers that serve it or load it on demand: routing a request reads a model's few specs, not
    the whole fleet."""
    index: dict[str, list[LiveWorker]] = {}
    for worker in workers:
        for spec in (*worker.specs, *worker.lazy_specs):
            index.setdefault(spec, []).append(worker)
    return index


_Snapshot = tuple[float, list[LiveWorker], dict[str, list[LiveWorker]]]
# Past its second, a snapshot is still served for up to this long while one background task reads a new one: with
# 1,000 workers the read (SMEMBERS + MGET + parsing) takes tens of ms, which no request should wait for.
_STALE_OK_S = 2.0
_refreshing: asyncio.Task | None = None


_generation = 0  # bumped by `registry_invalidate`: a read begun before it does not become the snapshot


async def _read() -> _Snapshot:
    global _snapshot
    generation = _generation
    client = async_redis()
    ids = [i.decode() for i in await client.smembers(redis_keys.WORKERS_SET)]
    values = await client.mget([redis_keys.worker(i) for i in ids]) if ids else []
    workers = _parse(values)
    snapshot = (time.monotonic() + _SNAPSHOT_S, workers, workers_by_spec(workers))
    if generation == _generation:
        _snapshot = snapshot
    return snapshot


async def _refresh() -> _Snapshot:
    """The cached snapshot; a stale one (expired under `_STALE_OK_S` ago) is served while a background task reads
    the next; with none (or a too old one) the caller waits for that read. One read at a time per process: when the
    event loop lagged past `_STALE_OK_S` under a burst, every waiting request read the registry itself, each on a new
    pooled connection, and the API spent a tenth of its CPU there exactly when it had none to spare."""
    now = time.monotonic()
    expires = _snapshot[0]
    if expires > now:
        return _snapshot
    reading = _reading()
    if expires and now - expires < _STALE_OK_S:
        return _snapshot
    return await asyncio.shield(reading)  # a caller that gives up does not cancel the others' read


def _reading() -> asyncio.Task:
    """The registry read in flight on this loop, started if there is none: one read at a time per process."""
    global _refreshing
    loop = asyncio.get_running_loop()
    if _refreshing is None or _refreshing.done() or _refreshing.get_loop() is not loop:
        _refreshing = loop.create_task(_read())
        _refreshing.add_done_callback(_log_refresh_error)
    return _refreshing


# A miss (no live worker for a model) re-reads a snapshot older than this before it stands; at most this often.
_MISS_REREAD_S = 0.25


async def registry_reread(*, older_than_s: float = _MISS_REREAD_S) -> bool:
    """Reads the registry now unless the snapshot was read under `older_than_s` ago; True when it read. A request
    that found no live worker asks this before its 503 stands: a worker that came up within the snapshot's
    lifetime (up to `_SNAPSHOT_S + _STALE_OK_S`) is routed to at once, and a model that stays down costs Redis at
    most one read per `older_than_s` (concurrent misses share it)."""
    if time.monotonic() - (_snapshot[0] - _SNAPSHOT_S) < older_than_s:
        return False
    await asyncio.shield(_reading())
    return True


def _log_refresh_error(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:  # Redis blip: the next request reads again
        log.warning("registry refresh failed: %s", task.exception())


async def live_workers() -> list[LiveWorker]:
    """Workers with a fresh heartbeat; cached for a second per process (routing reads it per request)."""
    return (await _refresh())[1]


async def live_workers_serving(specs: list[str]) -> list[LiveWorker]:
    """The live workers that serve any of `specs` (from the same cached snapshot), each once."""
    index = (await _refresh())[2]
    if len(specs) == 1:
        return index.get(specs[0], [])
    seen: dict[str, LiveWorker] = {}
    for spec in specs:
        for worker in index.get(spec, ()):
            seen.setdefault(worker.worker_id, worker)
    return list(seen.values())


def live_workers_sync() -> tuple[list[LiveWorker], list[str]]:
    """(live workers, ids whose heartbeat expired) for the control worker's registry sync."""
    client = sync_redis()
    ids = sorted(i.decode() for i in client.smembers(redis_keys.WORKERS_SET))
    values = client.mget([redis_keys.worker(i) for i in ids]) if ids else []
    gone = [worker_id for worker_id, value in zip(ids, values, strict=True) if value is None]
    return _parse(values), gone


def registry_invalidate() -> None:
    global _snapshot, _refreshing, _generation
    _snapshot = (0.0, [], {})
    _refreshing = None
    _generation += 1
