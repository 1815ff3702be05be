"""Redis clients for every farm process, all with one reconnect policy.

A client made by `redis.Redis.from_url` alone never retries: after a Redis restart every pooled connection is dead,
and each command that draws one fails ("Connection closed by server") although the server is back. Here a command
that meets a lost connection reconnects and runs again, with backoff, for about 5 s (a restart's downtime); only
then does the error reach the caller (the API answers 503). Control-plane code uses `sync_redis()` /
`async_redis()`; workers, which have no Django settings, call `redis_connect` / `aioredis_connect` with their URL.
"""

from __future__ import annotations

import asyncio
from functools import cache
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.driver_info import DriverInfo
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

# 0.05, 0.1, 0.2, 0.4, 0.8, 1, 1, 1, 1 s (jittered): ~5 s of reconnecting before a command gives up.
RECONNECT_RETRIES = 9
RECONNECT_BACKOFF = {"base": 0.05, "cap": 1.0}
# A pooled connection idle this long is PINGed before use (a dead one is replaced before the command is sent).
HEALTH_CHECK_INTERVAL_S = 30
# A sync client's connections; a thread that finds them all busy waits up to POOL_WAIT_S for one. (redis-py 8's
# plain pool holds 100 and raises `MaxConnectionsError` at the 101st: a worker's 1,100 task threads claiming at once
# under load failed their tasks, and Celery acked the messages, losing the jobs until the sweeper found them.)
SYNC_POOL_CONNECTIONS = 128
POOL_WAIT_S = 20.0

_async_clients: dict[int, aioredis.Redis] = {}
# What every connection announces with CLIENT SETINFO, made once: redis-py 8 otherwise reads its version from the
# installed package's metadata for each new connection (~0.6 ms of CPU each, measured 2026-12-03), and an API whose
# pool grows under a burst made hundreds of them while it was busiest.
_DRIVER_INFO = DriverInfo()


def _options(retry_class: type) -> dict[str, Any]:
    return {
        "retry": retry_class(ExponentialWithJitterBackoff(**RECONNECT_BACKOFF), RECONNECT_RETRIES),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        "driver_info": _DRIVER_INFO,
    }


def redis_connect(url: str, *, max_connections: int = SYNC_POOL_CONNECTIONS, **kwargs: Any) -> redis.Redis:
    """A sync client for `url` that rides out a Redis restart (see the module). Its pool blocks: with more threads
    than `max_connections` using it at once, the others wait their turn (up to `POOL_WAIT_S`) instead of failing."""
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=POOL_WAIT_S, **(_options(Retry) | kwargs)
    )
    return redis.Redis.from_pool(pool)


def aioredis_connect(url: str, **kwargs: Any) -> aioredis.Redis:
    """An asyncio client for `url` that rides out a Redis restart (see the module)."""
    return aioredis.Redis.from_url(url, **(_options(AsyncRetry) | kwargs))


@cache
def sync_redis() -> redis.Redis:
    """The control plane's sync client (one per process)."""
    from settings import env

    return redis_connect(env.REDIS_URL)


def async_redis() -> aioredis.Redis:
    """The control plane's client for the running loop (a pool is bound to the loop that first used it)."""
    from settings import env

    loop_id = id(asyncio.get_running_loop())
    client = _async_clients.get(loop_id)
    if client is None:
        client = aioredis_connect(env.REDIS_URL, max_connections=4096)
        _async_clients[loop_id] = client
    return client
