"""The live worker registry, read from Redis (workers write it with their heartbeats)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from farm import redis_keys
from farm.redis_client import async_redis, sync_redis

_SNAPSHOT_S = 1.0


@dataclass(frozen=True)
class LiveWorker:
    worker_id: str
    specs: tuple[str, ...]
    running: int
    capacity: int
    status: str  # ready | draining | quarantined
    running_jobs: frozenset[str]
    raw: dict[str, Any]

    @property
    def accepts_work(self) -> bool:
        return self.status == "ready"


def _parse(values: list[bytes | None]) -> list[LiveWorker]:
    workers = []
    for value in values:
        if value is None:  # expired: the worker went silent
            continue
        entry = orjson.loads(value)
        load = entry.get("load", {})
        workers.append(LiveWorker(
            worker_id=entry["worker_id"], specs=tuple(entry.get("specs", ())), running=load.get("running", 0),
            capacity=load.get("capacity", 1), status=entry.get("status", "ready"),
            running_jobs=frozenset(entry.get("running_jobs", ())), raw=entry,
        ))
    return workers


_snapshot: tuple[float, list[LiveWorker]] = (0.0, [])


async def live_workers() -> list[LiveWorker]:
    """Workers with a fresh heartbeat; cached for a second per process (routing reads it per request)."""
    global _snapshot
    expires, workers = _snapshot
    if expires > time.monotonic():
        return workers
    client = async_redis()
    ids = [i.decode() for i in await client.smembers(redis_keys.WORKERS_SET)]
    values = await client.mget([redis_keys.worker(i) for i in ids]) if ids else []
    workers = _parse(values)
    _snapshot = (time.monotonic() + _SNAPSHOT_S, workers)
    return workers


def live_workers_sync() -> tuple[list[LiveWorker], list[str]]:
    """(live workers, ids whose heartbeat expired) for the control worker's registry sync."""
    client = sync_redis()
    ids = sorted(i.decode() for i in client.smembers(redis_keys.WORKERS_SET))
    values = client.mget([redis_keys.worker(i) for i in ids]) if ids else []
    gone = [worker_id for worker_id, value in zip(ids, values, strict=True) if value is None]
    return _parse(values), gone


def registry_invalidate() -> None:
    global _snapshot
    _snapshot = (0.0, [])
