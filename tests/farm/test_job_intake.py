"""New inference jobs written in groups (`farm.job_intake`): what arrives while a write is in flight goes together,
each request gets its own job, row and message, and one refused row fails only its own request."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Iterator

import pytest
from django.contrib.auth import get_user_model
from redis.connection import Connection

from farm import job_intake, job_streams, queues, redis_keys, stream_format
from farm.catalog import model_upsert, spec_upsert
from farm.errors import FarmError
from farm.job_intake import Accepted, NewJob
from farm.models import Job, JobStatus
from farm.redis_client import sync_redis
from farm.stream_format import Delta, End, Failure, Restart

pytestmark = pytest.mark.django_db(transaction=True)  # rows are written on the API's own database threads

SPEC = f"intake-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def new_job() -> Iterator[NewJob]:
    owner = get_user_model().objects.create(username=f"intake-{uuid.uuid4().hex[:8]}")
    model = model_upsert(name="intake-test-model")
    spec = spec_upsert(model=model, name=SPEC, engine="vllm-cpu")
    sync_redis().delete(queues.infer_queue(SPEC))
    yield NewJob(
        owner_id=owner.pk,
        api_key_id=None,
        key_prefix="sk-test",
        kind="chat.completion",
        model_id=model.pk,
        model_name=model.name,
        spec_id=spec.pk,
        spec_name=SPEC,
        request={"messages": [{"role": "user", "content": "hi"}]},
        deadline=time.time() + 60,
    )
    sync_redis().delete(queues.infer_queue(SPEC))


@pytest.fixture
def groups(monkeypatch) -> list[int]:
    """The size of every group written, each write slowed by 50 ms (a busy database) so that requests pile up."""
    sizes: list[int] = []
    write = job_intake.jobs_create_and_publish

    def slow_write(new: list[NewJob]) -> list:
        sizes.append(len(new))
        time.sleep(0.05)
        return write(new)

    monkeypatch.setattr(job_intake, "jobs_create_and_publish", slow_write)
    return sizes


def queued_messages() -> dict[str, dict]:
    """job id -> (kwargs, headers) of every message in the spec's queue."""
    messages = {}
    for raw in sync_redis().lrange(queues.infer_queue(SPEC), 0, -1):
        message = json.loads(raw)
        _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        messages[kwargs["job_id"]] = {"kwargs": kwargs, "headers": message["headers"]}
    return messages


def submit_all(jobs: list[NewJob]) -> list[str | BaseException]:
    """Each job's id, or the error its request got."""

    async def scenario() -> list[Accepted | BaseException]:
        return await asyncio.gather(*(job_intake.job_intake(job) for job in jobs), return_exceptions=True)

    return [outcome.job_id if isinstance(outcome, Accepted) else outcome for outcome in asyncio.run(scenario())]


def test_requests_that_arrive_together_are_written_in_groups_each_with_its_own_row_and_message(
    new_job: NewJob, groups: list[int]
) -> None:
    jobs = [NewJob(**{**new_job.__dict__, "request": {"n": i}, "request_id": f"req_{i}"}) for i in range(40)]
    ids = submit_all(jobs)

    assert all(isinstance(job_id, str) for job_id in ids) and len(set(ids)) == 40
    assert sum(groups) == 40 and len(groups) < 10, groups  # grouped, not one write per request
    rows = {str(job.pk): job for job in Job.objects.filter(pk__in=ids)}
    messages = queued_messages()
    for i, job_id in enumerate(ids):
        assert rows[job_id].status == JobStatus.QUEUED and rows[job_id].request == {"n": i}
        assert rows[job_id].request_id == f"req_{i}" and rows[job_id].dispatched_at is not None
        assert messages[job_id]["kwargs"]["request"] == {"n": i}
        assert messages[job_id]["headers"]["farm_request_id"] == f"req_{i}"  # each message its own request's id
    # FIFO: a queue is consumed from its tail, so the first request accepted is the first message taken.
    tail = json.loads(base64.b64decode(json.loads(sync_redis().lindex(queues.infer_queue(SPEC), -1))["body"]))
    assert tail[1]["job_id"] == ids[0]


def test_a_lone_request_is_written_at_once(new_job: NewJob, groups: list[int]) -> None:
    [job_id] = submit_all([new_job])
    assert groups == [1] and Job.objects.get(pk=job_id).status == JobStatus.QUEUED


def test_a_row_the_database_refuses_fails_only_its_own_request(new_job: NewJob, groups: list[int]) -> None:
    """An owner that does not exist (a foreign key the database checks at commit) in a group of five."""
    jobs = [NewJob(**{**new_job.__dict__, "request": {"n": i}}) for i in range(5)]
    jobs[2] = NewJob(**{**new_job.__dict__, "owner_id": 10**9})
    outcomes = submit_all(jobs)

    refused = outcomes.pop(2)
    assert isinstance(refused, FarmError) and refused.status == 500
    assert all(isinstance(job_id, str) for job_id in outcomes)
    assert Job.objects.filter(pk__in=outcomes, status=JobStatus.QUEUED).count() == 4
    assert set(queued_messages()) == set(outcomes)  # the refused job has no message


def test_a_queued_jobs_stream_is_there_so_its_reader_never_reads_the_row(new_job: NewJob, monkeypatch) -> None:
    """The stream opens at intake, with the job's lifetime (deadline + STREAM_TTL_S): a reader that hears nothing
    while the job waits finds it and leaves the database alone (it used to read the row at every check)."""
    monkeypatch.setattr(job_streams, "LOST_STREAM_CHECK_S", 0.1)
    row_reads: list[str] = []
    read_row = job_streams.job_row_outcome
    monkeypatch.setattr(job_streams, "job_row_outcome", lambda job_id: row_reads.append(job_id) or read_row(job_id))
    [job_id] = submit_all([NewJob(**{**new_job.__dict__, "deadline": time.time() + 1.0})])
    key = redis_keys.job_stream(job_id)
    [(_entry_id, fields)] = sync_redis().xrange(key)
    assert stream_format.decode(fields[stream_format.FIELD.encode()]) == Restart(attempt=1)
    assert redis_keys.STREAM_TTL_S - 5 <= sync_redis().ttl(key) <= redis_keys.STREAM_TTL_S + 1

    async def read() -> list:
        return [event async for event in job_streams.job_stream_events(job_id, deadline=time.time() + 1.0)]

    events = asyncio.run(read())

    assert events[0] == Restart(attempt=1)  # skipped by every reader
    assert [type(event) for event in events[1:]] == [Failure] and events[1].status == 504  # nobody served it in time
    assert row_reads == []
    sync_redis().delete(key)  # lost (a Redis restart): the next reader asks the database, which says "still queued"
    events = asyncio.run(read())
    assert [type(event) for event in events] == [Failure] and events[0].status == 504 and len(row_reads) >= 5


def test_a_groups_streams_open_before_its_messages_in_the_same_round_trip(new_job: NewJob, monkeypatch) -> None:
    """The streams' opening entries and the messages leave in one write to Redis, the entries first: a worker that
    takes a message at once finds its job's stream there, and its first delta comes after the opening entry."""
    sent: list[bytes] = []
    send = Connection.send_packed_command

    def recorded(self: Connection, command: object, check_health: bool = True) -> None:
        sent.append(b"".join(command) if isinstance(command, list | tuple) else bytes(command))
        return send(self, command, check_health)

    monkeypatch.setattr(Connection, "send_packed_command", recorded)
    accepted = job_intake.jobs_create_and_publish([new_job, NewJob(**{**new_job.__dict__, "request": {"n": 2}})])
    monkeypatch.undo()
    ids = [a.job_id for a in accepted if isinstance(a, Accepted)]

    [write] = sent
    assert write.count(b"XADD") == 2 and write.count(b"LPUSH") == 1
    assert write.rindex(b"XADD") < write.index(b"LPUSH")
    assert set(queued_messages()) == set(ids)
    for job_id, acceptance in zip(ids, accepted, strict=True):
        [(entry_id, fields)] = sync_redis().xrange(redis_keys.job_stream(job_id))
        assert stream_format.decode(fields[stream_format.FIELD.encode()]) == Restart(attempt=1)
        assert acceptance.stream_after == entry_id  # where the request's reader starts


def answer_in_one_write(job_id: str) -> None:
    """A delta and the end in one atomic write (MULTI/EXEC; the worker uses a script): a blocked reader wakes once."""
    with sync_redis().pipeline(transaction=True) as pipe:
        job_streams._queue_appends(pipe, [(job_id, event, 60) for event in (Delta("hi", 1), End("stop", 3, 1))])
        pipe.execute()


@pytest.mark.parametrize("start", ["after the opening entry", "from the start"])
def test_the_requests_reader_starts_after_its_streams_opening_entry(new_job: NewJob, monkeypatch, start: str) -> None:
    """The intake returns the opening entry's id and the request's reader starts after it: a first read from the
    start returned at once with only that entry (which readers skip) and cost a round trip per request. A job
    answered in one write is read in one XREAD; from the start (the contrast) it took two."""
    reads: list[bytes] = []
    own_read = job_streams.OwnReads.read

    async def counted(self: job_streams.OwnReads, wait_s: float) -> list:
        reads.append(self.last_id)
        return await own_read(self, wait_s)

    monkeypatch.setattr(job_streams.OwnReads, "read", counted)
    [accepted] = job_intake.jobs_create_and_publish([new_job])
    assert isinstance(accepted, Accepted)
    after = accepted.stream_after if start == "after the opening entry" else job_streams.FROM_START

    async def scenario() -> tuple[str, object]:
        reader = asyncio.create_task(job_streams.job_collect(accepted.job_id, deadline=time.time() + 5, after=after))
        await asyncio.sleep(0.3)  # the reader waits for the worker, which then answers in one write
        await asyncio.to_thread(answer_in_one_write, accepted.job_id)
        return await reader

    text, final = asyncio.run(scenario())

    assert (text, final) == ("hi", End("stop", 3, 1))
    assert len(reads) == (1 if start == "after the opening entry" else 2)
