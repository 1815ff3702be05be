"""Reading a job's token stream from Redis (the worker writes it; see `farm.stream_format`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from farm import redis_keys, stream_format
from farm.redis_client import async_redis, sync_redis
from farm.stream_format import Delta, End, Failure, Restart, StreamEvent

_FIELD = stream_format.FIELD.encode()
# Extra seconds the reader waits past the deadline: the worker reports its own timeout first.
GRACE_S = 2.0


async def job_stream_events(job_id: str, *, deadline: float) -> AsyncIterator[StreamEvent]:
    """Yields the job's deltas (and `Restart`s of retried attempts) and ends with its `End` or `Failure`; a 504
    `Failure` if nothing ends it in time."""
    client = async_redis()
    key = redis_keys.job_stream(job_id)
    last_id = "0-0"
    while True:
        remaining = deadline + GRACE_S - time.time()
        if remaining <= 0:
            yield Failure(504, "timeout_error", "deadline_exceeded", "The request did not finish before its deadline.")
            return
        reply = await client.xread({key: last_id}, block=max(1, int(min(remaining, 10.0) * 1000)), count=512)
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                last_id = entry_id
                event = stream_format.decode(fields[_FIELD])
                yield event
                if isinstance(event, End | Failure):
                    return


async def job_collect(job_id: str, *, deadline: float) -> tuple[str, End | Failure]:
    """The whole text and the final event, for non-streaming responses."""
    parts: list[str] = []
    async for event in job_stream_events(job_id, deadline=deadline):
        if isinstance(event, Delta):
            parts.append(event.text)
        elif isinstance(event, Restart):
            parts.clear()
        else:
            return "".join(parts), event
    raise AssertionError("job stream ended without a final event")  # job_stream_events always ends with one


def job_stream_append(job_id: str, event: StreamEvent) -> None:
    """Control-plane writes (cancel, final failure after retries): readers see them like a worker's."""
    key = redis_keys.job_stream(job_id)
    with sync_redis().pipeline(transaction=False) as pipe:
        pipe.xadd(key, {stream_format.FIELD: stream_format.encode(event)})
        pipe.expire(key, redis_keys.STREAM_TTL_S)
        pipe.execute()
