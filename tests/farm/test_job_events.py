"""Coalesced job events applied in bulk (`farm.job_events`): the pure planner case by case, then against the
database: the same outcome as one event at a time, in a number of statements that does not grow per event."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

import farm.job_events
from farm import queues
from farm.api_keys import api_key_create
from farm.catalog import model_upsert, spec_upsert
from farm.job_events import INFERRED_START, JobRow, bulk_eligible, plan_event_run
from farm.jobs import job_apply_event, job_apply_events, job_create
from farm.models import ApiKey, Job, JobEvent, JobKind, JobStatus, Usage
from farm.redis_client import sync_redis

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
RESULT = {"text": "hi!", "finish_reason": "stop"}
SPEC = "job-events-test-spec"


def event(kind: str, job_id: str = "a", *, attempt: int = 1, worker_id: str = "w1", **detail: Any) -> dict[str, Any]:
    return {"job_id": job_id, "attempt": attempt, "kind": kind, "worker_id": worker_id, "detail": detail}


def row(status: str = JobStatus.QUEUED, *, attempt: int = 1, kind: str = JobKind.CHAT, key: int | None = 7) -> JobRow:
    return JobRow(kind, status, attempt, "", None, key, 1, "m", None)


# --- the planner ---------------------------------------------------------------------------------------------------


def test_only_starts_and_successes_in_the_workers_shape_join_a_run() -> None:
    assert bulk_eligible(event(JobStatus.RUNNING))
    assert bulk_eligible(event(JobStatus.SUCCEEDED, result=RESULT, usage=USAGE))
    assert not bulk_eligible(event(JobStatus.FAILED))
    assert not bulk_eligible(event("requeue"))
    assert not bulk_eligible(event("progress"))
    assert not bulk_eligible({**event(JobStatus.RUNNING), "unexpected": 1})
    assert not bulk_eligible({**event(JobStatus.RUNNING), "attempt": "1"})


@pytest.mark.parametrize(
    ("status", "attempt", "kind", "moves"),
    [
        (JobStatus.QUEUED, 1, JobStatus.RUNNING, True),
        (JobStatus.QUEUED, 2, JobStatus.RUNNING, False),  # a stale attempt
        (JobStatus.RUNNING, 1, JobStatus.RUNNING, False),  # a duplicate
        (JobStatus.SUCCEEDED, 1, JobStatus.RUNNING, False),  # late: the job ended
        (JobStatus.RUNNING, 1, JobStatus.SUCCEEDED, True),
        (JobStatus.QUEUED, 1, JobStatus.SUCCEEDED, True),  # its running event comes later (or never)
        (JobStatus.RUNNING, 2, JobStatus.SUCCEEDED, False),
        (JobStatus.CANCELED, 1, JobStatus.SUCCEEDED, False),  # never left; it may keep its output (goes alone)
        (JobStatus.SUCCEEDED, 1, JobStatus.SUCCEEDED, False),
    ],
)
def test_a_transition_moves_only_from_where_the_state_machine_allows(
    status: str, attempt: int, kind: str, moves: bool
) -> None:
    rows = {"a": row(status, attempt=attempt)}
    the_event = event(kind, result=RESULT, usage=USAGE)
    plan = plan_event_run([the_event], rows, now=NOW)
    assert plan.moved == int(moves)
    assert bool(rows["a"].changes) == moves
    assert plan.ended == (["a"] if moves and kind == JobStatus.SUCCEEDED else [])
    assert plan.alone == ([the_event] if status == JobStatus.CANCELED else [])  # `job_record_canceled_usage`


def test_start_then_success_in_one_run_is_one_row_write_and_two_history_entries() -> None:
    rows = {"a": row()}
    plan = plan_event_run(
        [event(JobStatus.RUNNING), event(JobStatus.SUCCEEDED, result=RESULT, usage=USAGE)], rows, now=NOW
    )
    assert rows["a"].changes == {
        "status": JobStatus.SUCCEEDED,
        "worker_id": "w1",
        "started_at": NOW,
        "finished_at": NOW,
        "usage": USAGE,
        "result": RESULT,
    }
    assert [(h.kind, h.detail) for h in plan.history] == [
        (JobStatus.RUNNING, {}),
        (JobStatus.SUCCEEDED, {"usage": USAGE}),  # the result lives on the job, not in its history
    ]
    assert plan.moved == 2


def test_a_success_that_overtakes_its_start_records_the_inferred_start_first() -> None:
    rows = {"a": row()}
    plan = plan_event_run([event(JobStatus.SUCCEEDED, result=RESULT, usage=USAGE)], rows, now=NOW)
    assert [(h.kind, h.detail) for h in plan.history] == [
        (JobStatus.RUNNING, INFERRED_START),
        (JobStatus.SUCCEEDED, {"usage": USAGE}),
    ]
    assert rows["a"].changes["worker_id"] == "w1"


def test_a_duplicate_success_in_the_same_run_is_ignored() -> None:
    rows = {"a": row(JobStatus.RUNNING)}
    success = event(JobStatus.SUCCEEDED, result=RESULT, usage=USAGE)
    plan = plan_event_run([success, success], rows, now=NOW)
    assert plan.moved == 1
    assert plan.usage == {(7, 1, "m", NOW.date()): [1, 5, 3]}


def test_usage_adds_up_per_key_model_and_day_and_skips_keyless_jobs() -> None:
    rows = {"a": row(JobStatus.RUNNING), "b": row(JobStatus.RUNNING), "c": row(JobStatus.RUNNING, key=None)}
    plan = plan_event_run(
        [event(JobStatus.SUCCEEDED, job_id, result=RESULT, usage=USAGE) for job_id in "abc"], rows, now=NOW
    )
    assert plan.usage == {(7, 1, "m", NOW.date()): [2, 10, 6]}
    assert plan.ended == ["a", "b", "c"]


def test_events_of_missing_and_training_jobs_go_back_in_order() -> None:
    rows = {"t": row(JobStatus.RUNNING, kind=JobKind.FINE_TUNE), "a": row()}
    events = [
        event(JobStatus.RUNNING, "t"),
        event(JobStatus.RUNNING, "a"),
        event(JobStatus.SUCCEEDED, "t"),
        event(JobStatus.RUNNING, "gone"),
    ]
    plan = plan_event_run(events, rows, now=NOW)
    assert plan.alone == [events[0], events[2], events[3]]
    assert plan.moved == 1
    assert not rows["t"].changes


# --- against the database ------------------------------------------------------------------------------------------


@pytest.fixture
def key() -> Iterator[ApiKey]:
    owner = get_user_model().objects.create(username=f"job-events-{timezone.now().timestamp()}")
    model_upsert(name="job-events-model")
    yield api_key_create(owner=owner, name="job-events")[0]
    sync_redis().delete(queues.infer_queue(SPEC))


def new_jobs(key: ApiKey, count: int, *, depends_on: list[str] | None = None) -> list[str]:
    model = model_upsert(name="job-events-model")
    spec = spec_upsert(model=model, name=SPEC, engine="vllm-cpu")
    return [
        str(
            job_create(
                owner_id=key.owner_id,
                api_key_id=key.pk,
                kind=JobKind.CHAT,
                model_id=model.pk,
                spec_id=spec.pk,
                request={"messages": [{"role": "user", "content": "hi"}]},
                deadline_at=timezone.now() + timedelta(minutes=1),
                depends_on=depends_on,
            ).pk
        )
        for _ in range(count)
    ]


def outcome(job_ids: list[str]) -> list[tuple[Any, ...]]:
    jobs = {str(pk): job for pk, job in Job.objects.in_bulk(job_ids).items()}
    return [
        (
            jobs[job_id].status,
            jobs[job_id].worker_id,
            jobs[job_id].result,
            jobs[job_id].usage,
            jobs[job_id].started_at is not None,
            jobs[job_id].finished_at is not None,
            list(JobEvent.objects.filter(job_id=job_id).values_list("kind", "attempt", "worker_id", "detail")),
        )
        for job_id in job_ids
    ]


def worker_message(job_ids: list[str]) -> list[dict[str, Any]]:
    """What a worker sends for these jobs, in the order it does under load: starts and outcomes interleaved, one
    success overtaking its own start, one duplicate."""
    first, *rest = job_ids
    events = [event(JobStatus.SUCCEEDED, first, result=RESULT, usage=USAGE), event(JobStatus.RUNNING, first)]
    for job_id in rest:
        events.append(event(JobStatus.RUNNING, job_id))
    for job_id in rest:
        events.append(event(JobStatus.SUCCEEDED, job_id, result=RESULT, usage=USAGE))
    return [*events, events[-1]]


@pytest.mark.django_db
@pytest.mark.parametrize("rows_per_insert", [farm.job_events.HISTORY_ROWS_PER_INSERT, 2])
def test_bulk_gives_the_same_jobs_history_and_usage_as_one_event_at_a_time(
    key: ApiKey, rows_per_insert: int, monkeypatch
) -> None:
    """Also with the history split over several multi-row INSERTs (2 rows each: 10 rows, 5 statements)."""
    monkeypatch.setattr(farm.job_events, "HISTORY_ROWS_PER_INSERT", rows_per_insert)
    one_by_one, bulk = new_jobs(key, 5), new_jobs(key, 5)
    for e in worker_message(one_by_one):
        job_apply_event(**e)
    usage_one_by_one = Usage.objects.get(api_key=key)
    assert (usage_one_by_one.requests, usage_one_by_one.prompt_tokens) == (5, 25)

    assert job_apply_events(events=worker_message(bulk)) == 9  # 4 starts + 5 successes (1 start inferred, 1 late)

    assert outcome(bulk) == outcome(one_by_one)
    usage = Usage.objects.get(api_key=key)
    assert (usage.requests, usage.prompt_tokens, usage.completion_tokens) == (10, 50, 30)


class StatementCounter:
    """A `connection.execute_wrapper` counting the statements the database runs: an `executemany` runs one per
    parameter set (Django's query log lists it once)."""

    def __init__(self) -> None:
        self.statements = 0

    def __call__(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        self.statements += len(params) if many else 1
        return execute(sql, params, many, context)


@pytest.mark.django_db
@pytest.mark.parametrize("jobs", [1, 20])
def test_a_run_costs_the_same_statements_for_one_job_or_twenty(key: ApiKey, jobs: int) -> None:
    """One locking read, one UPDATE of every changed job, one history INSERT, one usage upsert, and the transaction
    (a savepoint inside the test's): 6 whatever the run's length (28 for 20 jobs with one UPDATE per job and the
    usage ORM's update-then-create; one at a time each event costs its own transaction and two to eight)."""
    from django.db import connection

    job_ids = new_jobs(key, jobs)
    events = [event(JobStatus.RUNNING, job_id) for job_id in job_ids]
    events += [event(JobStatus.SUCCEEDED, job_id, result=RESULT, usage=USAGE) for job_id in job_ids]
    counter = StatementCounter()
    with connection.execute_wrapper(counter):
        assert job_apply_events(events=events) == 2 * jobs
    assert counter.statements <= 6
    assert set(Job.objects.filter(pk__in=job_ids).values_list("status", flat=True)) == {JobStatus.SUCCEEDED}
    usage = Usage.objects.get(api_key=key)
    assert (usage.requests, usage.prompt_tokens, usage.completion_tokens) == (jobs, 5 * jobs, 3 * jobs)


@pytest.mark.django_db
def test_without_update_from_the_rows_are_written_one_statement_each(key: ApiKey, monkeypatch) -> None:
    """SQLite before 3.33 (Django supports 3.31) has no UPDATE ... FROM: the same outcome, one UPDATE per job."""
    monkeypatch.setattr(farm.job_events, "update_from_supported", lambda: False)
    one_by_one, bulk = new_jobs(key, 4), new_jobs(key, 4)
    for e in worker_message(one_by_one):
        job_apply_event(**e)
    assert job_apply_events(events=worker_message(bulk)) == 7
    assert outcome(bulk) == outcome(one_by_one)


@pytest.mark.django_db
def test_a_long_run_is_written_in_chunks(key: ApiKey, monkeypatch) -> None:
    """More changed jobs than one UPDATE takes: every one of them still moves, with its own values."""
    monkeypatch.setattr(farm.job_events, "ROWS_PER_UPDATE", 3)
    job_ids = new_jobs(key, 7)
    events = [event(JobStatus.RUNNING, job_id, worker_id=f"w{n}") for n, job_id in enumerate(job_ids)]
    assert job_apply_events(events=events) == 7
    jobs = Job.objects.in_bulk(job_ids)
    assert [(jobs[j].status, jobs[j].worker_id) for j in map(uuid.UUID, job_ids)] == [
        (JobStatus.RUNNING, f"w{n}") for n in range(7)
    ]


@pytest.mark.django_db
def test_a_bulk_success_releases_the_jobs_waiting_on_it(key: ApiKey, django_capture_on_commit_callbacks) -> None:
    (dependency,) = new_jobs(key, 1)
    (dependent,) = new_jobs(key, 1, depends_on=[dependency])
    assert Job.objects.get(pk=dependent).dispatched_at is None
    with django_capture_on_commit_callbacks(execute=True):
        job_apply_events(
            events=[
                event(JobStatus.RUNNING, dependency),
                event(JobStatus.SUCCEEDED, dependency, result=RESULT, usage=USAGE),
            ]
        )
    assert Job.objects.get(pk=dependent).dispatched_at is not None  # published after the commit
    assert sync_redis().llen(queues.infer_queue(SPEC)) >= 1


@pytest.mark.django_db
def test_a_batch_whose_line_job_ended_in_bulk_gets_a_tick(key: ApiKey) -> None:
    from farm import redis_keys
    from farm.models import Batch, BatchLine

    job_ids = new_jobs(key, 2)
    batch = Batch.objects.create(owner_id=key.owner_id, endpoint="/v1/chat/completions", input_file_id="file-x")
    BatchLine.objects.create(batch=batch, index=0, custom_id="line-0", kind=JobKind.CHAT, model="m", job_id=job_ids[0])
    sync_redis().delete(redis_keys.batch_tick_pending(batch.pk))
    try:
        job_apply_events(events=[event(JobStatus.SUCCEEDED, j, result=RESULT, usage=USAGE) for j in job_ids])
        assert sync_redis().exists(redis_keys.batch_tick_pending(batch.pk))
    finally:
        sync_redis().delete(redis_keys.batch_tick_pending(batch.pk))


@pytest.mark.django_db
def test_a_failing_run_falls_back_to_one_event_at_a_time(key: ApiKey, monkeypatch) -> None:
    import farm.job_events

    def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("bulk path broken")

    monkeypatch.setattr(farm.job_events, "plan_event_run", broken)
    (job_id,) = new_jobs(key, 1)
    assert (
        job_apply_events(
            events=[event(JobStatus.RUNNING, job_id), event(JobStatus.SUCCEEDED, job_id, result=RESULT, usage=USAGE)]
        )
        == 2
    )
    assert Job.objects.get(pk=job_id).status == JobStatus.SUCCEEDED
