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
