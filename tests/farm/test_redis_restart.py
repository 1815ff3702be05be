"""A Redis restart, seen by one process: its Redis clients and its Celery publishes carry on.

Each test runs a Valkey of its own (nothing persisted) and restarts it under clients whose pools hold connections
to the old server, as an API or a worker holds them while the broker restarts.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from farm.celery_app import create_celery_app
from farm.dispatch import PUBLISH_RETRY_POLICY
from farm.embedded_redis import start_embedded_redis
from farm.redis_client import aioredis_connect, redis_connect
from tests.services import free_port

CONCURRENCY = 8


class Valkey:
    def __init__(self, data_dir: Path) -> None:
        self.port, self.data_dir = free_port(), data_dir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = self._start()
        self._restarting: threading.Thread | None = None

    def _start(self):
        return start_embedded_redis(
            port=self.port, data_dir=self.data_dir, log_file=self.data_dir / "redis.log", persistent=False
        )

    def stop(self) -> None:
        if self._restarting is not None:  # a delayed restart still to come: stop the server it starts
            self._restarting.join()
            self._restarting = None
        self.process.terminate()
        self.process.wait(timeout=30)

    def restart(self, *, after_s: float = 0.0) -> threading.Thread | None:
        """Stops the server and starts a fresh one, at once or `after_s` later on a thread."""
        self.stop()
        if not after_s:
            self.process = self._start()
            return None

        def later() -> None:
            time.sleep(after_s)
            self.process = self._start()

        thread = self._restarting = threading.Thread(target=later)
        thread.start()
        return thread


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[Valkey]:
    server = Valkey(tmp_path)
    yield server
    server.stop()


def test_async_client_reconnects_its_whole_pool_after_a_restart(valkey: Valkey) -> None:
    async def scenario() -> list[object]:
        client = aioredis_connect(valkey.url)
        await asyncio.gather(*(client.xadd("s", {"n": i}) for i in range(CONCURRENCY)))  # fills the pool
        assert len(client.connection_pool._available_connections) == CONCURRENCY
        valkey.restart()
        results = await asyncio.gather(
            *(client.xadd("s", {"n": i}) for i in range(CONCURRENCY)), return_exceptions=True
        )
        results.append(await client.xlen("s"))
        await client.aclose()
        return results

    results = asyncio.run(scenario())
    assert [r for r in results if isinstance(r, Exception)] == []
    assert results[-1] == CONCURRENCY  # the new server holds the writes made after the restart, once each


def test_async_client_waits_out_a_short_downtime(valkey: Valkey) -> None:
    async def scenario() -> tuple[bool, float]:
        client = aioredis_connect(valkey.url)
        await client.ping()
        thread = valkey.restart(after_s=1.0)
        started = time.monotonic()
        answer = await client.set("k", "v")
        elapsed = time.monotonic() - started
        await client.aclose()
        thread.join()
        return answer, elapsed

    answer, elapsed = asyncio.run(scenario())
    assert answer is True
    assert 0.9 <= elapsed < 5, elapsed


def test_sync_client_waits_out_a_short_downtime(valkey: Valkey) -> None:
    client = redis_connect(valkey.url)
    client.set("before", 1)
    thread = valkey.restart(after_s=1.0)
    started = time.monotonic()
    assert client.set("k", "v") is True
    assert 0.9 <= time.monotonic() - started < 5
    thread.join()
    assert client.get("before") is None  # a fresh server: this is the restart, not a pause


def test_a_publish_during_a_broker_restart_waits_for_the_broker(valkey: Valkey) -> None:
    """`PUBLISH_RETRY_POLICY` rides out the downtime: the message is in the queue of the restarted broker."""
    app = create_celery_app(broker_url=valkey.url, main="restart-test")
    app.send_task("farm.test.noop", kwargs={"n": 0}, queue="q", retry=True, retry_policy=PUBLISH_RETRY_POLICY)
    thread = valkey.restart(after_s=1.5)
    started = time.monotonic()
    app.send_task("farm.test.noop", kwargs={"n": 1}, queue="q", retry=True, retry_policy=PUBLISH_RETRY_POLICY)
    elapsed = time.monotonic() - started
    thread.join()
    assert 1.4 <= elapsed < 8, elapsed
    assert redis_connect(valkey.url).llen("q") == 1  # the message sent after the restart; the first one was lost
