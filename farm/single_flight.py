"""One read at a time per key: callers that miss a per-process cache while a read of the same key is in flight await
that read instead of starting their own.

Without it an expired entry is read once per request that finds it expired until the first read returns, and under
overload (an event loop seconds behind, a busy database pool) that is hundreds of identical reads at once, each
slowing the next: at 2,000 requests/s offered, 11 % of the API's CPU samples were in reloading the model catalogue
(BENCHMARKS.md, 2026-12-07 midday)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import TypeVar

T = TypeVar("T")


class SingleFlight:
    """Reads in flight by key, on the running event loop (a read belongs to the loop that started it)."""

    def __init__(self) -> None:
        self._flights: dict[Hashable, asyncio.Task] = {}
        self._generation = 0  # bumped by `forget`

    async def run(
        self, key: Hashable, read: Callable[[], Awaitable[T]], *, store: Callable[[T], None] | None = None
    ) -> T:
        """`read()`'s result, shared with every caller of the same `key` while it runs, and given to `store` (the
        cache) unless `forget` was called since the read began. A caller that is cancelled does not cancel the
        read: the others still wait for it."""
        loop = asyncio.get_running_loop()
        task = self._flights.get(key)
        if task is None or task.done() or task.get_loop() is not loop:
            task = loop.create_task(self._flight(read, store))
            self._flights[key] = task
            task.add_done_callback(lambda done: self._landed(key, done))
        return await asyncio.shield(task)

    def forget(self) -> None:
        """Later callers start new reads, and reads in flight are not stored: they may have begun before a change
        that later callers must see."""
        self._generation += 1
        self._flights.clear()

    async def _flight(self, read: Callable[[], Awaitable[T]], store: Callable[[T], None] | None) -> T:
        generation = self._generation
        value = await read()
        if store is not None and generation == self._generation:
            store(value)
        return value

    def _landed(self, key: Hashable, task: asyncio.Task) -> None:
        if self._flights.get(key) is task:
            self._flights.pop(key, None)  # `forget` may run on another thread's loop in between
        if not task.cancelled():
            task.exception()  # retrieved: a failure whose callers all left is not logged as never retrieved
