"""Shared Redis clients for the control plane: one sync client per process, one async client per event loop."""

from __future__ import annotations

import asyncio
from functools import cache

import redis
import redis.asyncio as aioredis

from settings import env

_async_clients: dict[int, aioredis.Redis] = {}


@cache
def sync_redis() -> redis.Redis:
    return redis.Redis.from_url(env.REDIS_URL, health_check_interval=30)


def async_redis() -> aioredis.Redis:
    """The client for the running loop (a pool is bound to the loop that first used it)."""
    loop_id = id(asyncio.get_running_loop())
    client = _async_clients.get(loop_id)
    if client is None:
        client = aioredis.Redis.from_url(env.REDIS_URL, max_connections=4096, health_check_interval=30)
        _async_clients[loop_id] = client
    return client
