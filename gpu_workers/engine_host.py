"""The worker's engine host: one asyncio loop thread that owns every engine and the async Redis client.

Each job attempt runs here as a coroutine (`gpu_workers.queue_consumer` takes the messages on this loop); other
threads (Celery task threads on brokers without BLMPOP, loads, the heartbeat) hand it coroutines with `run`. All
engine calls happen on this loop, so one `AsyncLLM` per spec serves every request and vLLM batches them continuously.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import redis.asyncio as aioredis
import uvloop

from farm.garbage_collection import freeze_startup, thawed
from farm.redis_client import aioredis_connect
from gpu_workers.engine import Engine, EngineConfig, create_engine
from gpu_workers.stream_writer import StreamWriter

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineHost:
    def __init__(self, *, redis_url: str) -> None:
        # uvloop, as vLLM's own server: this loop carries every token's output handling and stream write, and
        # asyncio's pure-Python loop was ~15 % of a busy worker's CPU samples (py-spy, BENCHMARKS.md 2026-12-02).
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="engine-loop", daemon=True)
        self._thread.start()
        self.engines: dict[str, Engine] = {}
        self.redis: aioredis.Redis = self.run(self._connect(redis_url))
        self.writer = StreamWriter(self.redis)

    @staticmethod
    async def _connect(redis_url: str) -> aioredis.Redis:
        return aioredis_connect(redis_url, max_connections=512)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Runs `coro` on the engine loop and waits for it (from any thread but the loop's own)."""
        return self.submit(coro).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def load(self, config: EngineConfig) -> Engine:
        """Loads a spec's engine on the loop thread (AsyncLLM binds its output handler to the loop)."""
        if config.spec_name not in self.engines:

            async def build() -> Engine:
                return create_engine(config)

            self.engines[config.spec_name] = self.run(build())
            freeze_startup(f"engine {config.spec_name}")  # a spec loaded on demand: out of full collections too
        return self.engines[config.spec_name]

    def engine(self, spec_name: str) -> Engine | None:
        return self.engines.get(spec_name)

    def unload(self, spec_name: str) -> None:
        """Shuts a spec's engine down on the loop thread (its engine core process ends, its memory is freed)."""
        engine = self.engines.pop(spec_name, None)
        if engine is not None:

            async def shutdown() -> None:
                engine.shutdown()

            with thawed():  # the engine's objects were frozen when it loaded: its cycles must be collectable
                self.run(shutdown())
                del engine  # its last reference goes inside the block: frozen again after it, its cycles would leak

    def close(self) -> None:
        for name, engine in self.engines.items():
            try:
                engine.shutdown()
            except Exception:
                log.exception("engine %s did not shut down cleanly", name)
        self.engines.clear()
        for what, closing in (("token stream writer", self.writer.aclose), ("redis client", self.redis.aclose)):
            try:
                self.run(closing(), timeout=5)
            except Exception:
                log.warning("%s did not close cleanly", what, exc_info=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()
