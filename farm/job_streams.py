"""Reading a job's token stream from Redis (the worker writes it; see `farm.stream_format`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.client import Pipeline
from redis.exceptions import TimeoutError as RedisTimeoutError

from farm import redis_keys, stream_format
from farm.db import run_db
from farm.redis_client import async_redis, sync_redis
from farm.stream_format import Delta, End, Failure, Restart, StreamEvent
from farm.stream_hub import BLOCK_S, COUNT, Entry, Subscription, stream_hub

_FIELD = stream_format.FIELD.encode()
# Extra seconds the reader waits past the deadline: the worker reports its own timeout first.
GRACE_S = 2.0
# A reader that has heard nothing for this long checks that the job's stream still exists. A Redis restart can lose
# it (with the outcome in it) after the job ended; the job's database row then tells how it ended. A stream exists
# from the job's intake on (`job_streams_open`), so only a lost one costs a database read.
LOST_STREAM_CHECK_S = 5.0
# A reader joins its process' stream hub when at least this many streams are being read there (itself included);
# with fewer, it reads its stream by itself: a shared read saves little when few streams get tokens at once, and the
# hub's wake-ups cost a round trip (BENCHMARKS.md, 2026-12-02, night). A reader that began alone joins the hub as
# soon as that many are open: in a closed loop whole waves of requests end together, and the first readers of the
# next wave would otherwise make an XREAD of their own for every token of their answers.
HUB_MIN_READERS = 16
# Where a reader that does not know its stream's opening entry starts.
FROM_START = b"0-0"


async def job_stream_batches(
    job_id: str, *, deadline: float, after: bytes = FROM_START
) -> AsyncIterator[list[StreamEvent]]:
    """The job's stream as it arrives, one non-empty list per read: deltas (and `Restart`s of retried attempts),
    ending with its `End` or `Failure`; a 504 `Failure` if nothing ends it in time. A reader that writes what it
    reads (SSE) sends each list in one write: under load a read returns many tokens at once. The process' stream hub
    reads it while many streams are open (`farm.stream_hub`: one XREAD for all of a process' readers).

    `after`: read from the entry after this id. The request that accepted the job passes its stream's opening entry
    (`job_streams_open`): a first read from the start would return at once with only that entry, which readers
    skip, and cost a round trip per request for nothing."""
    client = async_redis()
    key = redis_keys.job_stream(job_id)
    hub = stream_hub(client)
    hub.readers += 1
    subscription: Subscription | OwnReads = OwnReads(client, key, after)  # onto the hub at its first read if crowded
    try:
        sent = ""  # text of the current attempt read so far
        check_at = time.time() + LOST_STREAM_CHECK_S
        while True:
            now = time.time()
            remaining = deadline + GRACE_S - now
            if remaining <= 0:
                yield [
                    Failure(
                        504, "timeout_error", "deadline_exceeded", "The request did not finish before its deadline."
                    )
                ]
                return
            if isinstance(subscription, OwnReads) and hub.readers >= HUB_MIN_READERS:
                subscription = hub.subscribe(key, after=subscription.last_id) or subscription
            entries = await subscription.read(min(remaining, max(0.0, check_at - now)))
            if entries:
                check_at = time.time() + LOST_STREAM_CHECK_S
            elif time.time() >= check_at:
                check_at = time.time() + LOST_STREAM_CHECK_S
                ended = None if await client.exists(key) else await run_db(job_row_outcome, job_id)
                if ended is not None:
                    yield _rest_of(sent, *ended)
                    return
            batch: list[StreamEvent] = []
            for _entry_id, fields in entries:
                event = stream_format.decode(fields[_FIELD])
                batch.append(event)
                if isinstance(event, End | Failure):
                    yield batch
                    return
                sent = "" if isinstance(event, Restart) else sent + event.text
            if batch:
                yield batch
    finally:
        hub.readers -= 1
        if isinstance(subscription, Subscription):
            hub.unsubscribe(subscription)


class OwnReads:
    """A stream read by its own XREADs: while few streams are open, or a second reader of a stream the hub already
    reads for another."""

    def __init__(self, client: aioredis.Redis, key: str, after: bytes = FROM_START) -> None:
        self.client, self.key, self.last_id = client, key, after

    async def read(self, wait_s: float) -> list[Entry]:
        block_ms = max(1, int(min(wait_s, BLOCK_S) * 1000))
        try:
            reply = await self.client.xread({self.key: self.last_id}, block=block_ms, count=COUNT)
        except RedisTimeoutError:  # slow, not gone (a lost connection is a ConnectionError)
            return []
        entries = [entry for _stream, stream_entries in reply or () for entry in stream_entries]
        if entries:
            self.last_id = entries[-1][0]
        return entries


async def job_stream_events(job_id: str, *, deadline: float, after: bytes = FROM_START) -> AsyncIterator[StreamEvent]:
    """`job_stream_batches`, one event at a time."""
    async for batch in job_stream_batches(job_id, deadline=deadline, after=after):
        for event in batch:
            yield event


def _rest_of(sent: str, text: str, final: End | Failure) -> list[StreamEvent]:
    """What a reader that has yielded `sent` still needs to yield to end with the database's outcome."""
    if isinstance(final, Failure):
        return [final]
    events: list[StreamEvent] = []
    if not text.startswith(sent):  # what was sent belongs to an earlier attempt
        events.append(Restart(attempt=0))
        sent = ""
    if text[len(sent) :]:
        events.append(Delta(text=text[len(sent) :], tokens=0))
    return [*events, final]


def job_row_outcome(job_id: str) -> tuple[str, End | Failure] | None:
    """(text, final event) of an ended job, from its database row; None while it is queued or running."""
    from farm.jobs import SERVER_ERROR_CODES
    from farm.models import TERMINAL_STATUSES, Job, JobStatus

    job = Job.objects.filter(pk=job_id).values("status", "result", "usage", "error").first()
    if job is None or job["status"] not in TERMINAL_STATUSES:
        return None
    usage, error = job["usage"] or {}, job["error"] or {}
    message = error.get("message", "")
    if job["status"] == JobStatus.SUCCEEDED:
        result = job["result"] or {}
        return result.get("text", ""), End(
            finish_reason=result.get("finish_reason") or "stop",
            prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0),
        )
    if job["status"] == JobStatus.CANCELED:
        return "", Failure(409, "invalid_request_error", "canceled", "The job was canceled.")
    if job["status"] == JobStatus.TIMED_OUT:
        return "", Failure(
            504, "timeout_error", "deadline_exceeded", message or "The request did not finish before its deadline."
        )
    code = error.get("code", "internal_error")
    if code in SERVER_ERROR_CODES:
        return "", Failure(503, "server_error", code, message or "The job failed.")
    return "", Failure(400, "invalid_request_error", code, message or "The request was refused by the engine.")


async def job_collect(job_id: str, *, deadline: float, after: bytes = FROM_START) -> tuple[str, End | Failure]:
    """The whole text and the final event, for non-streaming responses (`after`: as `job_stream_batches`)."""
    parts: list[str] = []
    async for event in job_stream_events(job_id, deadline=deadline, after=after):
        if isinstance(event, Delta):
            parts.append(event.text)
        elif isinstance(event, Restart):
            parts.clear()
        else:
            return "".join(parts), event
    raise AssertionError("job stream ended without a final event")  # job_stream_events always ends with one


def job_streams_open(jobs: Sequence[tuple[str, float]], *, pipe: Pipeline | None = None) -> list[bytes] | None:
    """Creates the streams of new jobs, given as (job id, deadline in epoch seconds), in one round trip; with `pipe`,
    in that pipeline's (`farm.dispatch` sends them with the jobs' messages, and before them). Each starts with
    `Restart(1)` (attempt 1 begins: readers skip it) and lives until STREAM_TTL_S past its job's deadline; the job's
    last entry sets its final TTL. While its job waits in a queue the stream is there, so a reader that finds no
    stream knows Redis lost it: before, each reader of a job queued for longer than LOST_STREAM_CHECK_S read the
    job's row every LOST_STREAM_CHECK_S (at concurrency 64 on the demo model, 285 reads in 192 requests).

    Returns the opening entries' ids (the request's reader starts after its own); with `pipe`, None: they are in its
    replies (`opening_ids`)."""
    now = time.time()
    writes = [
        (job_id, Restart(attempt=1), int(max(0.0, deadline - now)) + redis_keys.STREAM_TTL_S)
        for job_id, deadline in jobs
    ]
    if pipe is None:
        return opening_ids(_append(writes), len(writes))
    _queue_appends(pipe, writes)
    return None


def opening_ids(replies: Sequence[Any], count: int) -> list[bytes]:
    """The entry ids of `count` appends that open a pipeline's replies (each an XADD's id, then its EXPIRE's)."""
    return list(replies[0 : 2 * count : 2])


def job_stream_append(job_id: str, event: StreamEvent) -> None:
    """Control-plane writes (cancel, final failure after retries): readers see them like a worker's."""
    _append([(job_id, event, redis_keys.STREAM_TTL_S)])


def _append(writes: Sequence[tuple[str, StreamEvent, int]]) -> list[Any]:
    """(job id, event, the stream's TTL in seconds afterwards) for each write, in one round trip; its replies."""
    with sync_redis().pipeline(transaction=False) as pipe:
        _queue_appends(pipe, writes)
        return pipe.execute()


def _queue_appends(pipe: Pipeline, writes: Sequence[tuple[str, StreamEvent, int]]) -> None:
    for job_id, event, ttl_s in writes:
        key = redis_keys.job_stream(job_id)
        pipe.xadd(key, {stream_format.FIELD: stream_format.encode(event)})
        pipe.expire(key, ttl_s)


def job_stream_outcome(job_id: str) -> End | Failure | None:
    """The job's final event if its worker already wrote one (its database row may lag: the outcome event travels
    through the control queue), else None."""
    entries = sync_redis().xrevrange(redis_keys.job_stream(job_id), count=1)
    if not entries:
        return None
    event = stream_format.decode(entries[0][1][_FIELD])
    return event if isinstance(event, End | Failure) else None


def job_stream_answered_at(job_id: str, attempt: int) -> float | None:
    """Epoch seconds at which `attempt` wrote its answer (`End`) to the job's stream, else None: the proof that the
    attempt finished although its outcome event may not have reached the database yet. The attempt that wrote the
    stream's last entry is named by the last `Restart` before it (none: attempt 1)."""
    client = sync_redis()
    key = redis_keys.job_stream(job_id)
    last = client.xrevrange(key, count=1)
    if not last or not isinstance(stream_format.decode(last[0][1][_FIELD]), End):
        return None
    writer = 1
    for _entry_id, fields in client.xrevrange(key):  # read only for the reaper's suspects: rare, and bounded
        event = stream_format.decode(fields[_FIELD])
        if isinstance(event, Restart):
            writer = event.attempt
            break
    if writer != attempt:
        return None
    entry_id = last[0][0]
    return int((entry_id.decode() if isinstance(entry_id, bytes) else entry_id).split("-")[0]) / 1000
