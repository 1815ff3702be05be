"""One blocking XREAD for every job stream an API process is reading.

Each open response used to block in its own XREAD: at 64 streams that is 64 Redis round trips (and 64 replies to
parse) per engine step, and the API's CPU per token was above vLLM's own server's (BENCHMARKS.md, 2026-12-02). Here
one task per event loop reads all the streams its readers follow in one XREAD and hands each reader its entries.

A new reader must join a read that is already blocked (if it is alone, on streams whose readers left: it is woken
at once). Under load it need not do anything: some other stream gets an entry within a millisecond or two, the read
returns, and the next one includes the new stream. If the blocked read is still blocked `WAKE_AFTER_S` later, the
hub XADDs to its own wake-up stream, which that XREAD also follows, so it returns at once (one small write, at most
one per read; a new job's first token takes several milliseconds to come from its worker, so the wait costs no
latency). A Redis error ends the read for every reader (each raises it, as its
own XREAD did); the next reader starts a new task.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from farm import redis_keys

# Longest one XREAD blocks: well under redis-py's socket timeout (5 s since redis-py 8), which would otherwise end a
# blocking read of streams that are silent for a while with a TimeoutError.
BLOCK_S = 2.0
# Most entries one read takes from one stream (the rest come with the next read).
COUNT = 512
# How long a new reader lets a blocked read go on before the hub ends it with a wake-up (see the module).
WAKE_AFTER_S = 0.001
# The wake-up stream keeps this many entries and outlives its hub by this long (a hub whose process died).
_WAKE_MAXLEN = 8
_WAKE_TTL_S = 3600

Entry = tuple[bytes, dict[bytes, bytes]]


class Subscription:
    """One reader's view of one stream: the entries the hub read for it, in order."""

    def __init__(self, key: str, after: bytes = b"0-0") -> None:
        self.key = key.encode()
        self.last_id = after
        self._entries: list[Entry] = []
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def _deliver(self, entries: list[Entry]) -> None:
        self._entries.extend(entries)
        self.last_id = entries[-1][0]
        self._ready.set()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._ready.set()

    async def read(self, wait_s: float) -> list[Entry]:
        """The entries read since the last call; waits up to `wait_s` for some ([] when none came). Raises the
        Redis error that ended the hub's read."""
        if not self._ready.is_set():
            try:
                async with asyncio.timeout(max(0.0, wait_s)):
                    await self._ready.wait()
            except TimeoutError:
                return []
        entries, self._entries = self._entries, []
        if not entries and self._error is not None:
            raise self._error
        if self._error is None:
            self._ready.clear()
        return entries


class StreamHub:
    """The multiplexed reader of one event loop (see the module)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.wake_key = redis_keys.stream_hub_wakeup(uuid.uuid4().hex)
        self._wake_id: bytes = b"0-0"
        self._subscriptions: dict[bytes, Subscription] = {}
        self._task: asyncio.Task[None] | None = None
        self._blocked = False  # an XREAD is in flight
        self._wake_due = False  # ... and a new reader waits for it to end (a wake-up is scheduled or sent)
        self.reads = 0  # XREADs made (tests, benchmarks)
        self.readers = 0  # streams being read on this loop, by the hub or by themselves (`farm.job_streams`)

    def subscribe(self, key: str, after: bytes = b"0-0") -> Subscription | None:
        """A subscription to the stream `key`, read from the entry after `after` (from its start by default); None if
        this hub already reads it for another reader (that one reads it by itself)."""
        if key.encode() in self._subscriptions:
            return None
        subscription = Subscription(key, after)
        self._subscriptions[subscription.key] = subscription
        if self._task is None or self._task.done():
            self._task = self.loop.create_task(self._run(), name="farm-stream-hub")
        elif self._blocked and not self._wake_due:
            self._wake_due = True
            if len(self._subscriptions) == 1:  # no other stream will end the read: wake it now
                self._wake_if_blocked(self.reads)
            else:
                self.loop.call_later(WAKE_AFTER_S, self._wake_if_blocked, self.reads)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if self._subscriptions.get(subscription.key) is subscription:
            del self._subscriptions[subscription.key]

    def _wake_if_blocked(self, read: int) -> None:
        if self._blocked and self.reads == read:  # the read the new reader waited for is still blocked
            task = self.loop.create_task(self._wake())
            _waking.add(task)
            task.add_done_callback(_waking.discard)

    async def _wake(self) -> None:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.xadd(self.wake_key, {"w": "1"}, maxlen=_WAKE_MAXLEN, approximate=False)
                pipe.expire(self.wake_key, _WAKE_TTL_S)
                await pipe.execute()
        except RedisError:  # the read in flight fails the same way and tells every reader
            pass

    async def _run(self) -> None:
        while self._subscriptions:
            streams: dict[Any, Any] = {key: sub.last_id for key, sub in self._subscriptions.items()}
            streams[self.wake_key] = self._wake_id
            self._blocked, self._wake_due = True, False
            try:
                self.reads += 1
                reply = await self.client.xread(streams, block=int(BLOCK_S * 1000), count=COUNT)
            except RedisTimeoutError:  # slow, not gone (a lost connection is a ConnectionError): read again
                continue
            except RedisError as exc:
                for subscription in self._subscriptions.values():
                    subscription._fail(exc)
                self._subscriptions.clear()
                return
            finally:
                self._blocked = False
            for key, entries in reply or ():
                subscription = self._subscriptions.get(key)
                if subscription is not None:
                    subscription._deliver(entries)
                elif key == self.wake_key.encode():
                    self._wake_id = entries[-1][0]


_hubs: dict[int, StreamHub] = {}
_waking: set[asyncio.Task[None]] = set()  # wake-ups in flight (a task nobody holds can be collected mid-way)


def stream_hub(client: aioredis.Redis) -> StreamHub:
    """The running loop's hub (a hub's task and its client's pool belong to the loop that made them)."""
    loop = asyncio.get_running_loop()
    hub = _hubs.get(id(loop))
    if hub is None or hub.loop is not loop or hub.client is not client:
        hub = _hubs[id(loop)] = StreamHub(client)
    return hub
