"""The token-stream writer: a stream's pending deltas go out as one entry, every stream's order kept, on real Redis."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from farm import redis_keys, stream_format
from farm.redis_client import aioredis_connect, sync_redis
from farm.stream_format import Delta, End, Failure, Restart
from gpu_workers.engine_host import EngineHost
from gpu_workers.stream_writer import StreamWriter, merge_deltas
from settings import env

END = End(finish_reason="stop", prompt_tokens=3, completion_tokens=4)


@pytest.mark.parametrize(
    ("pending", "expected"),
    [
        pytest.param([], [], id="nothing"),
        pytest.param(
            [("a", Delta("x", 1), False), ("a", Delta("y", 2), False), ("a", Delta("z", 1), False)],
            [("a", Delta("xyz", 4), False)],
            id="one stream's deltas join",
        ),
        pytest.param(
            [("a", Delta("x", 1), False), ("b", Delta("p", 1), False), ("a", Delta("y", 1), False)],
            [("a", Delta("xy", 2), False), ("b", Delta("p", 1), False)],
            id="other streams in between do not stop a join",
        ),
        pytest.param(
            [("a", Delta("x", 1), False), ("a", END, True), ("a", Delta("y", 1), False)],
            [("a", Delta("x", 1), False), ("a", END, True), ("a", Delta("y", 1), False)],
            id="never across an end",
        ),
        pytest.param(
            [("a", Delta("x", 1), False), ("a", Restart(2), False), ("a", Delta("y", 1), False)],
            [("a", Delta("x", 1), False), ("a", Restart(2), False), ("a", Delta("y", 1), False)],
            id="never across a restart",
        ),
        pytest.param(
            [("a", Restart(2), False), ("a", Delta("x", 1), False), ("a", Delta("y", 1), False)],
            [("a", Restart(2), False), ("a", Delta("xy", 2), False)],
            id="after a restart, the new attempt's deltas join",
        ),
        pytest.param(
            [("a", Delta("x", 1), False), ("a", Failure(504, "t", "c", "m"), True)],
            [("a", Delta("x", 1), False), ("a", Failure(504, "t", "c", "m"), True)],
            id="a failure stays its own entry",
        ),
    ],
)
def test_merge_deltas(pending: list, expected: list) -> None:
    assert merge_deltas(pending) == expected


def test_a_stream_written_while_a_flush_is_in_flight_arrives_whole_and_in_order() -> None:
    """Two jobs stream 200 deltas each, interleaved, without yielding between appends (the writer is behind): each
    stream reads back as the same text and token count, fewer entries than deltas, and ends with its End."""

    async def scenario() -> dict[str, list[stream_format.StreamEvent]]:
        client = aioredis_connect(env.REDIS_URL)
        writer = StreamWriter(client)
        jobs = [f"writer-test-{uuid.uuid4()}" for _ in range(2)]
        for step in range(200):
            for job in jobs:
                writer.append(job, Delta(f"{step},", 1))
            if step % 50 == 0:
                await asyncio.sleep(0)  # let a flush start with part of the stream pending
        for job in jobs:
            writer.append(job, END, final=True)
        await writer.flushed()
        read = {}
        for job in jobs:
            entries = await client.xrange(redis_keys.job_stream(job))
            read[job] = [stream_format.decode(fields[stream_format.FIELD.encode()]) for _id, fields in entries]
            assert 0 < await client.ttl(redis_keys.job_stream(job)) <= redis_keys.STREAM_TTL_S
            await client.delete(redis_keys.job_stream(job))
        await writer.aclose()
        await client.aclose()
        return read

    read = asyncio.run(scenario())
    expected_text = "".join(f"{step}," for step in range(200))
    for events in read.values():
        deltas = [event for event in events if isinstance(event, Delta)]
        assert "".join(delta.text for delta in deltas) == expected_text
        assert sum(delta.tokens for delta in deltas) == 200
        assert len(deltas) < 200 / 10  # joined: at most a handful of entries, not one per delta
        assert events[-1] == END


def test_a_redis_that_lost_the_append_script_gets_it_again() -> None:
    """A restarted Redis has no scripts: the next flush loads the writer's script again and writes. A stream expires
    only once its last entry is written."""

    async def scenario() -> tuple[list[stream_format.StreamEvent], int, int]:
        client = aioredis_connect(env.REDIS_URL)
        writer = StreamWriter(client)
        key = redis_keys.job_stream(job := f"writer-test-{uuid.uuid4()}")
        writer.append(job, Delta("a", 1))
        await writer.flushed()
        ttl_running = await client.ttl(key)
        await client.script_flush()  # what a restart without persistence of scripts leaves
        writer.append(job, Delta("b", 1))
        writer.append(job, END, final=True)
        await writer.flushed()
        entries = await client.xrange(key)
        ttl_ended = await client.ttl(key)
        await client.delete(key)
        await writer.aclose()
        await client.aclose()
        return (
            [stream_format.decode(fields[stream_format.FIELD.encode()]) for _id, fields in entries],
            ttl_running,
            ttl_ended,
        )

    events, ttl_running, ttl_ended = asyncio.run(scenario())
    assert events == [Delta("a", 1), Delta("b", 1), END]
    assert ttl_running == -1  # no expiry while the job runs
    assert 0 < ttl_ended <= redis_keys.STREAM_TTL_S


def test_engine_host_close_ends_the_writer_task() -> None:
    """A flusher left pending when the engine loop stopped was reported at exit ("Task was destroyed but it is
    pending!", at the end of every CI run): closing the host ends it first, after what was flushed reached Redis."""
    host = EngineHost(redis_url=env.REDIS_URL)
    job = f"writer-test-{uuid.uuid4()}"

    async def write() -> asyncio.Task:
        host.writer.append(job, END, final=True)
        await host.writer.flushed()
        assert host.writer._task is not None
        return host.writer._task

    task = host.run(write())
    assert not task.done()  # the flusher waits for the next append
    host.close()
    assert task.cancelled()
    client = sync_redis()
    assert client.xlen(redis_keys.job_stream(job)) == 1
    client.delete(redis_keys.job_stream(job))
