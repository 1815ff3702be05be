"""The API's registry snapshot: read once a second; past that, served stale for a moment while one background task
reads the next (no request waits for a 1,000-entry read), and read at once when there is none or it is too old."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from farm import redis_keys, registry
from farm.redis_client import sync_redis
from gpu_workers.heartbeat import Heartbeat


def advertise(worker_id: str) -> None:
    Heartbeat(
        client=sync_redis(),
        worker_id=worker_id,
        interval_s=1.0,
        ttl_s=30.0,
        describe=lambda: {
            "specs": ["registry-spec"],
            "status": "ready",
            "running_jobs": [],
            "load": {"running": 0, "capacity": 1},
        },
    ).beat()


@pytest.fixture(autouse=True)
def clean() -> Iterator[None]:
    registry.registry_invalidate()
    yield
    client = sync_redis()
    for worker_id in ("reg-1", "reg-2"):
        client.delete(redis_keys.worker(worker_id))
        client.srem(redis_keys.WORKERS_SET, worker_id)
    registry.registry_invalidate()


def ids(workers: list[registry.LiveWorker]) -> set[str]:
    return {w.worker_id for w in workers} & {"reg-1", "reg-2"}


def test_stale_snapshot_is_served_while_the_next_is_read_in_the_background() -> None:
    async def scenario() -> None:
        advertise("reg-1")
        assert ids(await registry.live_workers_serving(["registry-spec"])) == {"reg-1"}  # no snapshot: read now
        advertise("reg-2")
        assert ids(await registry.live_workers()) == {"reg-1"}  # within its second: cached
        _, workers, index = registry._snapshot
        registry._snapshot = (time.monotonic() - 0.5, workers, index)  # expired half a second ago
        assert ids(await registry.live_workers()) == {"reg-1"}  # served stale, at once ...
        assert registry._refreshing is not None
        await registry._refreshing  # ... while the next one is read
        assert ids(await registry.live_workers()) == {"reg-1", "reg-2"}

        _, workers, index = registry._snapshot
        sync_redis().delete(redis_keys.worker("reg-2"))
        registry._snapshot = (time.monotonic() - registry._STALE_OK_S - 1, workers, index)  # too old to serve
        assert ids(await registry.live_workers()) == {"reg-1"}  # read now

    asyncio.run(scenario())


@pytest.fixture
def reads(monkeypatch) -> list[int]:
    """`reads[0]`: how many times the registry was read from Redis since the test began."""
    count = [0]
    real_read = registry._read

    async def counted_read() -> registry._Snapshot:
        count[0] += 1
        return await real_read()

    monkeypatch.setattr(registry, "_read", counted_read)
    return count


def test_requests_that_find_no_usable_snapshot_share_one_read(reads: list[int]) -> None:
    """A burst that lags the loop past the stale window used to send every waiting request to Redis on its own."""

    async def scenario() -> None:
        advertise("reg-1")
        results = await asyncio.gather(*(registry.live_workers() for _ in range(50)))  # no snapshot yet
        assert reads[0] == 1 and all(ids(workers) == {"reg-1"} for workers in results)
        _, workers, index = registry._snapshot
        registry._snapshot = (time.monotonic() - registry._STALE_OK_S - 1, workers, index)  # too old to serve
        advertise("reg-2")
        results = await asyncio.gather(*(registry.live_workers() for _ in range(50)))
        assert reads[0] == 2 and all(ids(workers) == {"reg-1", "reg-2"} for workers in results)

    asyncio.run(scenario())


def test_a_miss_rereads_an_older_snapshot_at_most_every_quarter_second(reads: list[int]) -> None:
    """A request that finds no worker re-reads the registry before its 503 stands (a worker that came up within the
    snapshot's lifetime serves it); a model that stays down costs Redis one read per `_MISS_REREAD_S`, shared."""

    async def scenario() -> None:
        assert ids(await registry.live_workers()) == set()
        assert reads[0] == 1
        advertise("reg-1")
        assert ids(await registry.live_workers()) == set()  # cached: the new worker is not seen yet
        assert not await registry.registry_reread()  # read under a quarter second ago: no read
        await asyncio.sleep(registry._MISS_REREAD_S)
        assert all(await asyncio.gather(*(registry.registry_reread() for _ in range(20))))
        assert reads[0] == 2  # twenty misses, one read
        assert ids(await registry.live_workers()) == {"reg-1"}
        assert not await registry.registry_reread()

    asyncio.run(scenario())
