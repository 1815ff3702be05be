"""The stream hub: one XREAD serves every reader of a process, a reader that joins a blocked read is served at once,
a Redis error reaches every reader, and a second reader of one stream reads it by itself. Real Redis throughout."""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from farm import job_streams, redis_keys, stream_format, stream_hub
from farm.job_streams import job_stream_events
from farm.stream_format import Delta, End
from farm.stream_hub import StreamHub


def _text(fields: dict[bytes, bytes]) -> str:
    return stream_format.decode(fields[stream_format.FIELD.encode()]).text


def _keys(count: int) -> list[str]:
    return [f"farm:test:hub:{uuid.uuid4().hex}" for _ in range(count)]


async def _add(client: aioredis.Redis, key: str, text: str) -> None:
    await client.xadd(key, {stream_format.FIELD: stream_format.encode(Delta(text, 1))})


def test_one_read_serves_many_readers() -> None:
    async def main() -> None:
        client = aioredis.Redis.from_url(os.environ["REDIS_URL"])
        hub = StreamHub(client)
        keys = _keys(20)
        try:
            subscriptions = [hub.subscribe(key) for key in keys]
            await asyncio.sleep(0.05)  # the hub's read is blocked on all 20
            reads_before = hub.reads
            async with client.pipeline(transaction=False) as pipe:
                for n, key in enumerate(keys):
                    pipe.xadd(key, {stream_format.FIELD: stream_format.encode(Delta(f"t{n}", 1))})
                await pipe.execute()
            got = [await sub.read(5.0) for sub in subscriptions if sub is not None]
            assert [[_text(fields) for _id, fields in entries] for entries in got] == [[f"t{n}"] for n in range(20)]
            # One write to 20 streams, 20 readers: one or two reads, not twenty.
            assert hub.reads - reads_before <= 2
        finally:
            for sub in subscriptions:
                if sub is not None:
                    hub.unsubscribe(sub)
            await client.delete(*keys, hub.wake_key)
            await client.aclose()

    asyncio.run(main())


def test_a_reader_that_joins_a_blocked_read_is_served_at_once() -> None:
    async def main() -> None:
        client = aioredis.Redis.from_url(os.environ["REDIS_URL"])
        hub = StreamHub(client)
        first_key, late_key = _keys(2)
        try:
            first = hub.subscribe(first_key)
            await asyncio.sleep(0.1)  # blocked for up to BLOCK_S on the first stream alone
            late = hub.subscribe(late_key)
            assert first is not None and late is not None
            started = time.perf_counter()
            await _add(client, late_key, "late")
            entries = await late.read(5.0)
            waited = time.perf_counter() - started
            assert [_text(fields) for _id, fields in entries] == ["late"]
            assert waited < stream_hub.BLOCK_S / 4  # woken, not left until the blocked read timed out
            assert await client.xlen(hub.wake_key) == 1  # by its wake-up stream
            assert await first.read(0) == []
        finally:
            await client.delete(first_key, late_key, hub.wake_key)
            await client.aclose()

    asyncio.run(main())


def test_a_redis_error_reaches_every_reader_and_the_next_reader_starts_afresh() -> None:
    async def main() -> None:
        # Nothing listens on port 1; no reconnecting (the farm's clients retry for ~5 s, then fail the same way).
        dead = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
        hub = StreamHub(dead)
        subscriptions = [hub.subscribe(key) for key in _keys(3)]
        for sub in subscriptions:
            assert sub is not None
            with pytest.raises(RedisConnectionError):
                await sub.read(5.0)
        assert hub._task is not None and hub._task.done()
        again = hub.subscribe(_keys(1)[0])
        assert again is not None and hub._task is not None and not hub._task.done()
        with pytest.raises(RedisConnectionError):
            await again.read(5.0)
        await dead.aclose()

    asyncio.run(main())


def test_two_readers_of_one_job_both_get_the_whole_stream(monkeypatch) -> None:
    """The second reads by itself (`job_streams.OwnReads`)."""
    monkeypatch.setattr(job_streams, "LOST_STREAM_CHECK_S", 60)  # no database in this test
    monkeypatch.setattr(job_streams, "HUB_MIN_READERS", 1)
    hubs: list[StreamHub] = []
    job_id = uuid.uuid4().hex
    key = redis_keys.job_stream(job_id)

    async def main() -> list[list]:
        client = aioredis.Redis.from_url(os.environ["REDIS_URL"])

        async def reader() -> list:
            hubs.append(stream_hub.stream_hub(job_streams.async_redis()))
            return [event async for event in job_stream_events(job_id, deadline=time.time() + 10)]

        async def writer() -> None:
            await asyncio.sleep(0.1)
            for text in ("a", "b"):
                await _add(client, key, text)
                await asyncio.sleep(0.02)
            await client.xadd(key, {stream_format.FIELD: stream_format.encode(End("stop", 3, 2))})

        try:
            first, second, _ = await asyncio.gather(reader(), reader(), writer())
            return [first, second]
        finally:
            await client.delete(key)
            await client.aclose()

    first, second = asyncio.run(main())
    assert first == second == [Delta("a", 1), Delta("b", 1), End("stop", 3, 2)]
    assert hubs[0] is hubs[1] and hubs[0].reads >= 1 and hubs[0].readers == 0


def test_few_open_streams_read_by_themselves(monkeypatch) -> None:
    """Below `HUB_MIN_READERS` streams a reader makes its own XREADs; from it on, readers join the hub."""
    monkeypatch.setattr(job_streams, "LOST_STREAM_CHECK_S", 60)
    monkeypatch.setattr(job_streams, "HUB_MIN_READERS", 3)
    job_ids = [uuid.uuid4().hex for _ in range(4)]

    async def main() -> tuple[list[list], StreamHub, list[int]]:
        client = aioredis.Redis.from_url(os.environ["REDIS_URL"])
        hub = stream_hub.stream_hub(job_streams.async_redis())
        subscribed: list[int] = []

        async def reader(job_id: str) -> list:
            events = []
            async for event in job_stream_events(job_id, deadline=time.time() + 10):
                if not events:
                    subscribed.append(len(hub._subscriptions))
                events.append(event)
            return events

        async def writer() -> None:
            await asyncio.sleep(0.1)
            for job_id in job_ids:
                await client.xadd(
                    redis_keys.job_stream(job_id), {stream_format.FIELD: stream_format.encode(End("stop", 1, 0))}
                )

        try:
            *results, _ = await asyncio.gather(*(reader(job_id) for job_id in job_ids), writer())
            return results, hub, subscribed
        finally:
            await client.delete(*(redis_keys.job_stream(job_id) for job_id in job_ids))
            await client.aclose()

    results, hub, subscribed = asyncio.run(main())
    assert results == [[End("stop", 1, 0)]] * 4
    assert max(subscribed) == 2  # the 3rd and 4th readers joined the hub; the first two read by themselves
    assert hub.readers == 0


def test_a_reader_that_began_alone_joins_the_hub_once_streams_crowd(monkeypatch) -> None:
    """A closed loop's waves end together, so the next wave's first readers start alone; they move onto the hub
    when enough streams are open, mid-answer, without losing or repeating an entry."""
    monkeypatch.setattr(job_streams, "LOST_STREAM_CHECK_S", 60)
    monkeypatch.setattr(job_streams, "HUB_MIN_READERS", 3)
    first, *others = job_ids = [uuid.uuid4().hex for _ in range(3)]

    async def main() -> tuple[list[list], list[bool]]:
        client = aioredis.Redis.from_url(os.environ["REDIS_URL"])
        hub = stream_hub.stream_hub(job_streams.async_redis())
        on_hub: list[bool] = []  # per event of the first reader: was its stream read by the hub then

        async def reader(job_id: str) -> list:
            events = []
            async for event in job_stream_events(job_id, deadline=time.time() + 10):
                if job_id == first:
                    on_hub.append(redis_keys.job_stream(job_id).encode() in hub._subscriptions)
                events.append(event)
            return events

        async def writer() -> None:
            await asyncio.sleep(0.1)
            await _add(client, redis_keys.job_stream(first), "a")  # read by its own XREAD: it is alone
            await asyncio.sleep(0.1)
            tasks = [asyncio.create_task(reader(job_id)) for job_id in others]  # now three streams are open
            await asyncio.sleep(0.1)
            for text in ("b", "c"):
                await _add(client, redis_keys.job_stream(first), text)
                await asyncio.sleep(0.05)
            for job_id in job_ids:
                await client.xadd(
                    redis_keys.job_stream(job_id), {stream_format.FIELD: stream_format.encode(End("stop", 1, 3))}
                )
            return await asyncio.gather(*tasks)

        try:
            alone, crowd = await asyncio.gather(reader(first), writer())
            return [alone, *crowd], on_hub
        finally:
            await client.delete(*(redis_keys.job_stream(job_id) for job_id in job_ids))
            await client.aclose()

    results, on_hub = asyncio.run(main())
    assert results[0] == [Delta("a", 1), Delta("b", 1), Delta("c", 1), End("stop", 1, 3)]
    assert results[1:] == [[End("stop", 1, 3)]] * 2
    # "b" ends the XREAD the reader was blocked in when the others came; from its next read on, the hub reads it.
    assert on_hub == [False, False, True, True]
