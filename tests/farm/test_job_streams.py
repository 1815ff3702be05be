"""A reader whose job stream vanished (a Redis restart after the job ended) ends with the database's outcome."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from farm import job_streams, redis_keys
from farm.catalog import model_upsert, spec_upsert
from farm.job_streams import job_stream_append, job_stream_events
from farm.jobs import job_apply_event, job_create
from farm.models import Job, JobKind
from farm.redis_client import sync_redis
from farm.stream_format import Delta, End, Failure, Restart

pytestmark = pytest.mark.django_db(transaction=True)  # the reader looks the row up on the API's own DB threads

USAGE = {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}


@pytest.fixture
def job(monkeypatch) -> Iterator[Job]:
    monkeypatch.setattr(job_streams, "LOST_STREAM_CHECK_S", 0.2)
    owner = get_user_model().objects.create(username="stream-owner")
    model = model_upsert(name="streams-test-model")
    spec = spec_upsert(model=model, name="streams-test-spec", engine="vllm-cpu")
    job = job_create(
        owner_id=owner.pk,
        api_key_id=None,
        kind=JobKind.CHAT,
        model_id=model.pk,
        spec_id=spec.pk,
        request={"messages": [{"role": "user", "content": "hi"}]},
        deadline_at=timezone.now() + timedelta(minutes=1),
    )
    yield job
    sync_redis().delete(redis_keys.job_stream(str(job.pk)))


def read(job: Job, *, after_first: Callable[[], None] | None = None, timeout_s: float = 10) -> list:
    """Every event the reader yields; `after_first` runs once the first event is out (the 'restart')."""

    async def collect() -> list:
        events = []
        async for event in job_stream_events(str(job.pk), deadline=time.time() + timeout_s):
            events.append(event)
            if len(events) == 1 and after_first is not None:
                after_first()
        return events

    return asyncio.run(collect())


def end(job: Job, kind: str, **detail) -> None:
    job_id = str(job.pk)
    job_apply_event(job_id=job_id, attempt=1, kind="running", worker_id="w1", detail={})
    job_apply_event(job_id=job_id, attempt=1, kind=kind, worker_id="w1", detail=detail)


def lose_stream(job: Job) -> None:
    sync_redis().delete(redis_keys.job_stream(str(job.pk)))


def test_the_rest_of_the_text_comes_from_the_row(job: Job) -> None:
    job_stream_append(str(job.pk), Delta(text="Hel", tokens=1))
    end(job, "succeeded", result={"text": "Hello", "finish_reason": "length"}, usage=USAGE)

    events = read(job, after_first=lambda: lose_stream(job))

    assert events == [
        Delta(text="Hel", tokens=1),
        Delta(text="lo", tokens=0),
        End(finish_reason="length", prompt_tokens=5, completion_tokens=4),
    ]


def test_text_of_another_attempt_is_restarted(job: Job) -> None:
    job_stream_append(str(job.pk), Delta(text="Bye", tokens=1))
    end(job, "succeeded", result={"text": "Hello", "finish_reason": "stop"}, usage=USAGE)

    events = read(job, after_first=lambda: lose_stream(job))

    assert events == [
        Delta(text="Bye", tokens=1),
        Restart(attempt=0),
        Delta(text="Hello", tokens=0),
        End(finish_reason="stop", prompt_tokens=5, completion_tokens=4),
    ]


@pytest.mark.parametrize(
    ("kind", "detail", "expected"),
    [
        ("canceled", {}, (409, "canceled")),
        ("timed_out", {"error": {"code": "deadline_exceeded", "message": "late"}}, (504, "deadline_exceeded")),
        ("failed", {"error": {"code": "engine_error", "message": "boom", "retry": False}}, (503, "engine_error")),
        ("failed", {"error": {"code": "invalid_value", "message": "bad", "retry": False}}, (400, "invalid_value")),
    ],
)
def test_a_job_that_ended_otherwise_ends_with_its_failure(
    job: Job, kind: str, detail: dict, expected: tuple[int, str]
) -> None:
    if kind == "canceled":
        from farm.jobs import job_cancel

        job_cancel(job_id=str(job.pk), owner_id=job.owner_id)
    else:
        end(job, kind, **detail)
    lose_stream(job)  # the cancel also wrote its failure to the stream; Redis lost it

    (failure,) = read(job)

    assert isinstance(failure, Failure)
    assert (failure.status, failure.code) == expected


def test_a_running_job_without_a_stream_is_waited_for(job: Job) -> None:
    """No stream and no outcome yet (queued or running): the reader keeps waiting, here until its deadline."""
    started = time.monotonic()
    (failure,) = read(job, timeout_s=0.5)
    assert (failure.status, failure.code) == (504, "deadline_exceeded")
    assert time.monotonic() - started >= 0.5
