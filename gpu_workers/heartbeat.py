"""Advertises this worker in the live registry: hardware, specs served, load. A key with a TTL per worker."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import redis

from farm import redis_keys

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(
        self, *, client: redis.Redis, worker_id: str, interval_s: float, ttl_s: float,
        describe: Callable[[], dict[str, Any]],
    ) -> None:
        self._client = client
        self._worker_id = worker_id
        self._interval_s = interval_s
        self._ttl_s = ttl_s
        self._describe = describe
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def beat(self) -> None:
        entry = {**self._describe(), "worker_id": self._worker_id, "ts": time.time()}
        with self._client.pipeline(transaction=False) as pipe:
            pipe.set(redis_keys.worker(self._worker_id), orjson.dumps(entry), px=int(self._ttl_s * 1000))
            pipe.sadd(redis_keys.WORKERS_SET, self._worker_id)
            pipe.execute()

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.beat()
            except redis.RedisError as exc:  # a broker blip must not kill the worker; the next beat retries
                log.warning("heartbeat failed: %s", exc)

    def stop(self) -> None:
        """Stops beating and leaves the registry at once, so routing stops sending work here."""
        self._stop.set()
        try:
            self._client.delete(redis_keys.worker(self._worker_id))
            self._client.srem(redis_keys.WORKERS_SET, self._worker_id)
        except redis.RedisError:
            log.warning("could not remove %s from the registry; its entry expires by TTL", self._worker_id)
