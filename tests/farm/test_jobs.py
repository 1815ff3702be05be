"""The job state machine: guarded transitions, no-op duplicates and late events, retries, cancellation, and
terminal states that are never left (by the services, nor by a raw UPDATE)."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import orjson
import pytest
from django.contrib.auth import get_user_model
from django.db import DatabaseError, transaction
from django.utils import timezone

from farm import queues, redis_keys, stream_format
from farm.catalog import model_upsert, spec_upsert
from farm.errors import Conflict, NotFound
from farm.job_streams import job_stream_append
from farm.jobs import (
    USAGE_EVENT,
    QueuedJob,
    job_apply_event,
    job_cancel,
    job_create,
    job_insert_queued,
    job_is_terminal,
)
from farm.models import TERMINAL_STATUSES, Job, JobEvent, JobKind, JobStatus
from farm.redis_client import sync_redis

pytestmark = pytest.mark.django_db

SPEC = "jobs-test-spec"
USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
RESULT = {"text": "hi!", "finish_reason": "stop"}
RETRYABLE = {"code": "engine_error", "message": "RuntimeError: boom", "retry": True}


@pytest.fixture
def job() -> Iterator[Job]:
    owner = get_user_model().objects.create(username="job-owner")
    model = model_upsert(name="jobs-test-model")
    spec = spec_upsert(model=model, name=SPEC, engine="vllm-cpu")
    sync_redis().delete(queues.infer_queue(SPEC))
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
    job_id = str(job.pk)
    sync_redis().delete(queues.infer_queue(SPEC), redis_keys.job_stream(job_id), redis_keys.job_cancel(job_id))


def test_the_hot_path_insert_writes_the_row_job_create_writes(job: Job) -> None:
    """`job_insert_queued` (raw SQL, the inference hot path) and `job_create` (the ORM) make the same row: every
    column but the id and the clocks, the JSON request and the deadline read back equal, on either database."""
    request = {"messages": [{"role": "user", "content": "h\u00e9llo \U0001f600"}], "max_tokens": 7, "stop": ["x"]}
    Job.objects.filter(pk=job.pk).update(request=request, request_id="req-123")
    before = timezone.now()
    job_id = uuid.uuid4()
    job_insert_queued(
        [
            QueuedJob(
                id=job_id,
                owner_id=job.owner_id,
                api_key_id=None,
                kind=JobKind.CHAT,
                model_id=job.model_id,
                spec_id=job.spec_id,
                request=request,
                deadline_at=job.deadline_at,
                request_id="req-123",
            )
        ]
    )
    inserted = Job.objects.get(pk=job_id)
    created = Job.objects.get(pk=job.pk)
    clocks = {"id", "created_at", "dispatched_at"}
    fields = [f.attname for f in Job._meta.concrete_fields if f.name not in clocks]
    assert {f: getattr(inserted, f) for f in fields} == {f: getattr(created, f) for f in fields}
    assert inserted.status == JobStatus.QUEUED and inserted.attempt == 1 and inserted.request == request
    assert before <= inserted.created_at == inserted.dispatched_at <= timezone.now()
    assert job_apply_event(job_id=str(job_id), attempt=1, kind=JobStatus.RUNNING, worker_id="w1", detail={})


def apply(job: Job, kind: str, *, attempt: int = 1, worker_id: str = "w1", **detail: Any) -> bool:
    return job_apply_event(job_id=str(job.pk), attempt=attempt, kind=kind, worker_id=worker_id, detail=detail)


def events(job: Job) -> list[tuple[str, int, str]]:
    return list(JobEvent.objects.filter(job=job).values_list("kind", "attempt", "worker_id"))


def published() -> list[dict[str, Any]]:
    """Inference messages waiting in the spec's queue (Celery on Redis: a list of base64 JSON bodies)."""
    messages = []
    for raw in sync_redis().lrange(queues.infer_queue(SPEC), 0, -1):
        message = orjson.loads(raw)
        _, kwargs, _ = orjson.loads(base64.b64decode(message["body"]))
        messages.append({"eta": message["headers"].get("eta"), **kwargs})
    return messages


def stream_events(job: Job) -> list[stream_format.StreamEvent]:
    entries = sync_redis().xrange(redis_keys.job_stream(str(job.pk)))
    return [stream_format.decode(fields[stream_format.FIELD.encode()]) for _, fields in entries]


# Forward moves -----------------------------------------------------------------------------------------------------


def test_queued_running_succeeded(job: Job) -> None:
    assert (job.status, job.attempt, job.started_at, job.finished_at) == (JobStatus.QUEUED, 1, None, None)

    assert apply(job, JobStatus.RUNNING)
    job.refresh_from_db()
    assert (job.status, job.worker_id) == (JobStatus.RUNNING, "w1")
    assert job.started_at is not None and job.finished_at is None

    assert apply(job, JobStatus.SUCCEEDED, result=RESULT, usage=USAGE)
    job.refresh_from_db()
    assert (job.status, job.result, job.usage, job.error) == (JobStatus.SUCCEEDED, RESULT, USAGE, None)
    assert job.finished_at >= job.started_at
    assert events(job) == [(JobStatus.RUNNING, 1, "w1"), (JobStatus.SUCCEEDED, 1, "w1")]
    # The event keeps the usage but not the generated text (it lives on the job row only).
    assert JobEvent.objects.get(job=job, kind=JobStatus.SUCCEEDED).detail == {"usage": USAGE}


def test_final_failure_keeps_its_error(job: Job) -> None:
    error = {"code": "context_length_exceeded", "message": "too long", "retry": False}
    assert apply(job, JobStatus.RUNNING)
    assert apply(job, JobStatus.FAILED, error=error, usage=USAGE)
    job.refresh_from_db()
    assert (job.status, job.error, job.result, job.attempt) == (JobStatus.FAILED, error, None, 1)


@pytest.mark.parametrize("kind", [status for status in TERMINAL_STATUSES if status != JobStatus.SUCCEEDED])
def test_queued_job_may_end_without_running(job: Job, kind: str) -> None:
    assert apply(job, kind, worker_id="")
    job.refresh_from_db()
    assert job.status == kind
    assert job.started_at is None and job.finished_at is not None
    assert events(job) == [(kind, 1, "")]


def test_a_success_that_overtakes_its_running_event_records_both_in_order(job: Job) -> None:
    """Both events are control messages applied by concurrent threads: a short attempt's outcome can land first."""
    assert apply(job, JobStatus.SUCCEEDED, worker_id="w1", result=RESULT, usage=USAGE)
    job.refresh_from_db()
    assert (job.status, job.worker_id, job.result) == (JobStatus.SUCCEEDED, "w1", RESULT)
    assert job.started_at is not None and job.finished_at >= job.started_at
    assert events(job) == [(JobStatus.RUNNING, 1, "w1"), (JobStatus.SUCCEEDED, 1, "w1")]

    assert not apply(job, JobStatus.RUNNING, worker_id="w1")  # the late message itself: a no-op
    assert events(job) == [(JobStatus.RUNNING, 1, "w1"), (JobStatus.SUCCEEDED, 1, "w1")]


def test_a_success_of_a_stale_attempt_infers_nothing(job: Job) -> None:
    assert not apply(job, JobStatus.SUCCEEDED, attempt=2, result=RESULT, usage=USAGE)
    job.refresh_from_db()
    assert (job.status, job.started_at) == (JobStatus.QUEUED, None)
    assert events(job) == []


# Duplicates, late and stale events ---------------------------------------------------------------------------------


def test_duplicate_running_is_a_noop_and_keeps_the_first_worker(job: Job) -> None:
    assert apply(job, JobStatus.RUNNING, worker_id="w1")
    started_at = Job.objects.get(pk=job.pk).started_at
    assert not apply(job, JobStatus.RUNNING, worker_id="w2")
    job.refresh_from_db()
    assert (job.status, job.worker_id, job.started_at) == (JobStatus.RUNNING, "w1", started_at)
    assert events(job) == [(JobStatus.RUNNING, 1, "w1")]


def test_late_running_after_the_end_does_not_reopen_the_job(job: Job) -> None:
    assert apply(job, JobStatus.RUNNING, worker_id="w1")
    assert apply(job, JobStatus.FAILED, error={"code": "bad_input", "retry": False})
    assert not apply(job, JobStatus.RUNNING, worker_id="w2")
    job.refresh_from_db()
    assert (job.status, job.worker_id) == (JobStatus.FAILED, "w1")
    assert events(job) == [(JobStatus.RUNNING, 1, "w1"), (JobStatus.FAILED, 1, "w1")]


@pytest.mark.parametrize("terminal", TERMINAL_STATUSES)
@pytest.mark.parametrize(
    ("kind", "detail"),
    [
        *[(status, {"error": {"code": "second"}, "result": RESULT}) for status in TERMINAL_STATUSES],
        (JobStatus.RUNNING, {}),
        (JobStatus.QUEUED, {}),
        ("requeue", {"reason": "worker draining"}),
        (JobStatus.FAILED, {"error": RETRYABLE}),
    ],
)
def test_terminal_states_are_never_left(job: Job, terminal: str, kind: str, detail: dict[str, Any]) -> None:
    assert apply(job, JobStatus.RUNNING)
    assert apply(job, terminal, error={"code": "first"}, usage=USAGE)
    before = Job.objects.filter(pk=job.pk).values().get()
    assert not apply(job, kind, **detail)
    assert Job.objects.filter(pk=job.pk).values().get() == before
    assert [event[0] for event in events(job)] == [JobStatus.RUNNING, terminal]
    assert published() == []
    assert job_is_terminal(terminal)


@pytest.mark.parametrize("terminal", TERMINAL_STATUSES)
def test_the_database_refuses_to_move_a_terminal_job(job: Job, terminal: str) -> None:
    assert apply(job, terminal)
    for status in (JobStatus.QUEUED, JobStatus.RUNNING, *(s for s in TERMINAL_STATUSES if s != terminal)):
        with pytest.raises(DatabaseError), transaction.atomic():
            Job.objects.filter(pk=job.pk).update(status=status)
    Job.objects.filter(pk=job.pk).update(status=terminal, worker_id="other")  # other columns may change
    assert Job.objects.get(pk=job.pk).status == terminal


def test_events_for_a_stale_attempt_are_ignored(job: Job) -> None:
    Job.objects.filter(pk=job.pk).update(attempt=2)  # attempt 1 was requeued
    assert not apply(job, JobStatus.RUNNING, attempt=1, worker_id="old")
    assert apply(job, JobStatus.RUNNING, attempt=2, worker_id="new")
    assert not apply(job, JobStatus.FAILED, attempt=1, worker_id="old", error={"code": "late"})
    assert not apply(job, JobStatus.FAILED, attempt=1, worker_id="old", error=RETRYABLE)
    assert not apply(job, "requeue", attempt=1, worker_id="old")
    job.refresh_from_db()
    assert (job.status, job.attempt, job.worker_id, job.error) == (JobStatus.RUNNING, 2, "new", None)
    assert events(job) == [(JobStatus.RUNNING, 2, "new")]


@pytest.mark.parametrize("kind", ["queued", "exploded", ""])
def test_unknown_or_backward_events_are_ignored(job: Job, kind: str) -> None:
    assert not apply(job, kind)
    job.refresh_from_db()
    assert job.status == JobStatus.QUEUED
    assert events(job) == []


def test_events_for_a_missing_job_are_ignored(job: Job) -> None:
    missing = Job(pk="00000000-0000-4000-8000-000000000000")
    assert not apply(missing, JobStatus.RUNNING)
    assert not apply(missing, JobStatus.FAILED, error=RETRYABLE)
    assert not JobEvent.objects.filter(job_id=missing.pk).exists()


# Retries -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "detail", "backoff"),
    [
        pytest.param(JobStatus.FAILED, {"error": RETRYABLE, "usage": USAGE}, True, id="retryable-failure"),
        pytest.param("requeue", {"reason": "worker shutting down"}, False, id="hand-back"),
    ],
)
def test_a_retry_requeues_the_next_attempt_and_publishes_it_after_commit(
    job: Job,
    django_capture_on_commit_callbacks,
    kind: str,
    detail: dict[str, Any],
    backoff: bool,
) -> None:
    assert apply(job, JobStatus.RUNNING)
    with django_capture_on_commit_callbacks(execute=True):
        assert apply(job, kind, **detail)
        assert published() == []  # nothing leaves before the commit
    job.refresh_from_db()
    assert (job.status, job.attempt, job.worker_id, job.started_at) == (JobStatus.QUEUED, 2, "", None)
    assert [event[:2] for event in events(job)] == [(JobStatus.RUNNING, 1), ("requeued", 1)]
    assert JobEvent.objects.get(job=job, kind="requeued").detail["next_attempt"] == 2
    [message] = published()
    assert (message["job_id"], message["attempt"], message["spec"]) == (str(job.pk), 2, SPEC)
    assert (message["eta"] is not None) == backoff
    # The first attempt's late events no longer count; the second attempt runs normally.
    assert not apply(job, JobStatus.SUCCEEDED, attempt=1)
    assert apply(job, JobStatus.RUNNING, attempt=2, worker_id="w2")
    assert apply(job, JobStatus.SUCCEEDED, attempt=2, worker_id="w2", result=RESULT)


def test_retries_stop_at_max_attempts_with_a_final_failure(job: Job, django_capture_on_commit_callbacks) -> None:
    Job.objects.filter(pk=job.pk).update(attempt=job.max_attempts)
    assert apply(job, JobStatus.RUNNING, attempt=job.max_attempts)
    with django_capture_on_commit_callbacks(execute=True):
        moved = apply(job, JobStatus.FAILED, attempt=job.max_attempts, error=RETRYABLE)
    job.refresh_from_db()
    assert (job.status, job.attempt, job.error["code"]) == (JobStatus.FAILED, job.max_attempts, "retries_exhausted")
    assert published() == []
    [failure] = stream_events(job)  # readers waiting on the stream are told
    assert isinstance(failure, stream_format.Failure) and failure.code == "retries_exhausted"
    assert moved  # `job_apply_event` returns whether the job moved: it did, to failed


# Cancellation ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("started", [False, True])
def test_cancel_ends_an_active_job_and_signals_workers(
    job: Job, django_capture_on_commit_callbacks, started: bool
) -> None:
    if started:
        assert apply(job, JobStatus.RUNNING)
    with django_capture_on_commit_callbacks(execute=True):
        canceled = job_cancel(job_id=str(job.pk), owner_id=job.owner_id, by="api")
    assert (canceled.status, canceled.error["code"]) == (JobStatus.CANCELED, "canceled")
    assert sync_redis().exists(redis_keys.job_cancel(str(job.pk)))
    assert [type(e).__name__ for e in stream_events(job)] == ["Failure"]
    # Canceling again is a no-op. A success that crossed the cancel keeps its output and tokens, once; the job stays
    # canceled (a terminal state is final).
    assert job_cancel(job_id=str(job.pk), owner_id=job.owner_id).status == JobStatus.CANCELED
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert apply(job, JobStatus.SUCCEEDED, result=RESULT, usage=usage)
    assert not apply(job, JobStatus.SUCCEEDED, result=RESULT, usage=usage)
    job.refresh_from_db()
    assert (job.status, job.result, job.usage) == (JobStatus.CANCELED, RESULT, usage)
    kinds = [event[0] for event in events(job)]
    assert kinds == [JobStatus.RUNNING] * started + [JobStatus.CANCELED, USAGE_EVENT]


def test_cancel_of_a_finished_job_is_a_conflict(job: Job) -> None:
    assert apply(job, JobStatus.SUCCEEDED, result=RESULT)
    with pytest.raises(Conflict):
        job_cancel(job_id=str(job.pk), owner_id=job.owner_id)
    assert Job.objects.get(pk=job.pk).status == JobStatus.SUCCEEDED


def test_cancel_of_another_owners_job_is_not_found(job: Job) -> None:
    with pytest.raises(NotFound):
        job_cancel(job_id=str(job.pk), owner_id=job.owner_id + 1)
    assert Job.objects.get(pk=job.pk).status == JobStatus.QUEUED


def test_job_is_terminal() -> None:
    assert [s for s in JobStatus if job_is_terminal(s)] == list(TERMINAL_STATUSES)


@pytest.mark.parametrize("row_status", [JobStatus.RUNNING, JobStatus.QUEUED])
def test_cancel_after_the_worker_answered_is_a_conflict(job: Job, row_status: str) -> None:
    """The worker wrote the final event (the client has its answer) but its `succeeded` event, and even its
    `running` one (they travel together when the job is short), are still on the control queue: a cancel now must
    not turn an answered job into a canceled one."""
    if row_status == JobStatus.RUNNING:
        assert apply(job, JobStatus.RUNNING)
    job_stream_append(str(job.pk), stream_format.End(finish_reason="stop", prompt_tokens=5, completion_tokens=3))
    with pytest.raises(Conflict):
        job_cancel(job_id=str(job.pk), owner_id=job.owner_id)
    assert apply(job, JobStatus.SUCCEEDED, usage=USAGE, result=RESULT)
    job.refresh_from_db()
    assert job.status == JobStatus.SUCCEEDED


# Coalesced events (one control message) ---------------------------------------------------------------------------


def test_coalesced_events_apply_in_order_in_one_message(job: Job, django_capture_on_commit_callbacks) -> None:
    from farm.jobs import job_apply_events

    base = {"job_id": str(job.pk), "attempt": 1, "worker_id": "w1"}
    retried: list[dict[str, Any]] = []
    broken = {**base, "kind": JobStatus.RUNNING, "unexpected": "field"}  # job_apply_event raises TypeError
    with django_capture_on_commit_callbacks(execute=True):
        moved = job_apply_events(
            events=[
                {**base, "kind": JobStatus.RUNNING, "detail": {}},
                broken,
                {**base, "kind": "progress", "detail": {"step": 1}},
                {**base, "kind": JobStatus.SUCCEEDED, "detail": {"result": RESULT, "usage": USAGE}},
                {**base, "kind": JobStatus.SUCCEEDED, "detail": {"result": RESULT, "usage": USAGE}},  # a duplicate
            ],
            apply_alone=retried.append,
        )
    assert moved == 3
    assert retried == [broken]  # handed on alone; the others landed
    job.refresh_from_db()
    assert (job.status, job.result) == (JobStatus.SUCCEEDED, RESULT)
    assert [kind for kind, _, _ in events(job)] == [JobStatus.RUNNING, "progress", JobStatus.SUCCEEDED]
