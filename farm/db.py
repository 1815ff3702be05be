"""Runs ORM work for async views on a small dedicated thread pool.

Django's async ORM hops to a per-request thread under ASGI, which opens and closes a database connection per
request; this pool keeps a fixed set of threads with persistent connections instead (CONN_MAX_AGE).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="farm-db")


async def run_db(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor, functools.partial(fn, *args, **kwargs))
