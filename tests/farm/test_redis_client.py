"""`farm.redis_client`'s sync pool on real Redis: more threads than connections wait their turn, none fails."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from farm.redis_client import SYNC_POOL_CONNECTIONS, redis_connect
from settings import env


def test_more_threads_than_connections_wait_for_one_instead_of_failing() -> None:
    """Each command holds its connection 0.2 s (a BLPOP that times out): 16 threads on 2 connections run in 8 waves.
    redis-py's plain pool raised `MaxConnectionsError` at the third (a busy worker's task threads lost their jobs)."""
    client = redis_connect(env.REDIS_URL, max_connections=2)
    key = f"test:empty:{uuid.uuid4()}"
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(lambda _: client.blpop([key], timeout=0.2), range(16)))
    finally:
        client.close()
    assert results == [None] * 16
    assert time.monotonic() - started >= 8 * 0.2 * 0.9  # they did share two connections


def test_the_default_pool_is_bounded_and_blocking() -> None:
    client = redis_connect(env.REDIS_URL)
    try:
        assert client.connection_pool.max_connections == SYNC_POOL_CONNECTIONS
        assert client.ping()
    finally:
        client.close()


def test_new_connections_announce_the_driver_without_reading_package_metadata(monkeypatch) -> None:
    """redis-py 8 read its version from the installed package for every new connection (~0.6 ms each); an API whose
    async pool grew under a burst spent a tenth of its CPU there. Made once, it is still announced (CLIENT SETINFO)."""
    import asyncio

    import redis

    from farm.redis_client import aioredis_connect

    def no_metadata(_: str) -> str:
        raise AssertionError("package metadata read while connecting")

    monkeypatch.setattr("redis.utils.metadata.version", no_metadata)
    client = redis_connect(env.REDIS_URL, max_connections=4)
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:  # four connections made at once
            list(pool.map(lambda _: client.blpop([f"test:empty:{uuid.uuid4()}"], timeout=0.1), range(4)))
        info = client.client_info()  # servers before Redis 7.2 list no lib-name / lib-ver
        assert (info.get("lib-name", "redis-py"), info.get("lib-ver", redis.__version__)) == (
            "redis-py",
            redis.__version__,
        )
    finally:
        client.close()

    async def async_side() -> dict:
        aclient = aioredis_connect(env.REDIS_URL)
        try:
            await asyncio.gather(*(aclient.blpop([f"test:empty:{uuid.uuid4()}"], timeout=0.1) for _ in range(4)))
            return await aclient.client_info()
        finally:
            await aclient.aclose()

    assert asyncio.run(async_side()).get("lib-ver", redis.__version__) == redis.__version__
