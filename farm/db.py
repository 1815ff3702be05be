"""Runs ORM work for async views on a small dedicated thread pool.

Django's async ORM hops to a per-request thread under ASGI, which opens and closes a database connection per
request; this pool keeps a fixed set of threads with persistent connections instead (CONN_MAX_AGE).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

POOL_SIZE = 8
_executor = ThreadPoolExecutor(max_workers=POOL_SIZE, thread_name_prefix="farm-db")


async def run_db(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()  # the request id (farm.request_ids) follows the call into the pool
    return await loop.run_in_executor(_executor, functools.partial(context.run, _dropping_broken, fn, *args, **kwargs))


def _dropping_broken(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Runs `fn`; if the database connection failed under it, the thread's connection is dropped when it is no longer
    usable, so the next call reconnects (after an outage the pool recovers by itself). Nothing else checks these
    persistent connections: Django does it per request, in the request's own thread, not in this pool."""
    from django.db import InterfaceError, OperationalError, connections

    try:
        return fn(*args, **kwargs)
    except (OperationalError, InterfaceError):
        for connection in connections.all(initialized_only=True):
            connection.close_if_unusable_or_obsolete()
        raise


def close_pool_connections() -> None:
    """Closes the database connection of every pool thread (before a test database is dropped, or after a
    credentials change). One task per thread, held at a barrier until all started, so each thread runs one."""
    import threading

    from django.db import connections

    barrier = threading.Barrier(POOL_SIZE)

    def close() -> None:
        barrier.wait(timeout=30)
        connections.close_all()

    for future in [_executor.submit(close) for _ in range(POOL_SIZE)]:
        future.result()
