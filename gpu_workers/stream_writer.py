"""Batches token-stream writes to Redis: one command per engine step for all running requests.

Each request's deltas arrive once per engine step; writing them one XADD at a time costs a round trip and an
event-loop hop each, on the same thread (and GIL) as vLLM's output handler. Here they are queued and a single
flusher sends everything pending at once, preserving each stream's order. A request's deltas that pile up while a
flush is in flight (the writer is behind the engine) go out as one entry: its reader then decodes and forwards one
event instead of many, so a busy farm spends less per token exactly when it has the least to spare.

The flush is one call of a small Lua script (`APPEND_SCRIPT`) that does the XADDs (and a finished stream's EXPIRE)
on the server, rather than a pipeline of one XADD per entry: redis-py packs, sends and parses each command of a
pipeline in Python, ~13 us per entry on the 2-core dev VM against ~4 us for the script's arguments; Valkey spends
~0.3 us more per entry running the script (BENCHMARKS.md, 2026-12-07 night). The farm's Redis is never a cluster
(kombu's transport needs one server), so one script may write many streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis

from farm import redis_keys, stream_format
from farm.stream_format import Delta, StreamEvent

log = logging.getLogger(__name__)

# KEYS: the streams, in write order (a stream may repeat). ARGV[1]: the TTL of a finished stream; then per key its
# entry's `m` field and "1" when it is the stream's last entry (then the stream expires), else "0".
APPEND_SCRIPT = f"""
local ttl = ARGV[1]
for i, key in ipairs(KEYS) do
  redis.call('XADD', key, '*', '{stream_format.FIELD}', ARGV[2 * i])
  if ARGV[2 * i + 1] == '1' then redis.call('EXPIRE', key, ttl) end
end
return #KEYS
"""


def merge_deltas(pending: list[tuple[str, StreamEvent, bool]]) -> list[tuple[str, StreamEvent, bool]]:
    """`pending` (stream key, event, final) with each stream's consecutive deltas joined into one, every stream's
    order kept. Entries of different streams never merge, and nothing merges across a non-delta event."""
    merged: list[tuple[str, StreamEvent, bool]] = []
    last_delta: dict[str, int] = {}  # stream key -> index in `merged` of its last entry, while that is a delta
    for key, event, final in pending:
        at = last_delta.get(key)
        if isinstance(event, Delta) and at is not None and not final:
            previous = merged[at][1]
            assert isinstance(previous, Delta)
            merged[at] = (key, Delta(previous.text + event.text, previous.tokens + event.tokens), False)
            continue
        if isinstance(event, Delta) and not final:
            last_delta[key] = len(merged)
        else:
            last_delta.pop(key, None)
        merged.append((key, event, final))
    return merged


class StreamWriter:
    """Lives on the engine loop; `append` never blocks, `flushed` waits until what was appended is in Redis."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._append = client.register_script(APPEND_SCRIPT)  # EVALSHA; loads it again after a Redis restart
        self._pending: list[tuple[str, StreamEvent, bool]] = []  # (stream key, event, expire after write)
        self._waiters: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def append(self, job_id: str, event: StreamEvent, *, final: bool = False) -> None:
        self._pending.append((redis_keys.job_stream(job_id), event, final))
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def flushed(self) -> None:
        """Returns once everything appended so far is written (raises if the write failed)."""
        if not self._pending and not self._waiters:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wake.set()
        await waiter

    async def aclose(self) -> None:
        """Stops the flusher and waits for it to end (what is still pending is dropped: call `flushed` first to keep
        it). A flusher left pending when its loop stops is reported as a destroyed task at exit."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            waiters, self._waiters = self._waiters, []
            try:
                if batch:
                    keys: list[str] = []
                    args: list[bytes | int] = [redis_keys.STREAM_TTL_S]
                    for key, event, final in merge_deltas(batch):
                        keys.append(key)
                        args += (stream_format.encode(event), 1 if final else 0)
                    await self._append(keys=keys, args=args)
            except Exception as exc:  # Redis down: fail the waiters (their jobs retry); keep serving others
                log.warning("token stream write of %d entries failed: %s", len(batch), exc)
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(exc)
                continue
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
