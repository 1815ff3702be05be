"""Usage per (key, model, day): recorded once per succeeded job by the state machine (and once per canceled job whose
worker reports the tokens it used before the abort), concurrently safe, and read back by the key's owner only
(`GET /v1/usage`)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client
from django.utils import timezone

from farm import queues
from farm.api_keys import api_key_create
from farm.catalog import model_upsert, spec_upsert
from farm.jobs import job_apply_event, job_cancel, job_create
from farm.models import ApiKey, Job, JobKind, JobStatus, Model, ModelSpec, Usage
from farm.redis_client import sync_redis
from farm.usage import usage_record

SPEC = "usage-test-spec"


@pytest.fixture
def catalog() -> Iterator[tuple[Model, ModelSpec]]:
    model = model_upsert(name="usage-test-model")
    spec = spec_upsert(model=model, name=SPEC, engine="vllm-cpu")
    yield model, spec
    sync_redis().delete(queues.infer_queue(SPEC))


@pytest.fixture
def key(catalog) -> tuple[ApiKey, str]:
    owner = get_user_model().objects.create(username=f"usage-owner-{timezone.now().timestamp()}")
    return api_key_create(owner=owner, name="usage")


def new_job(key: ApiKey, model: Model, spec: ModelSpec, *, kind: str = JobKind.CHAT) -> str:
    job = job_create(
        owner_id=key.owner_id,
        api_key_id=key.pk,
        kind=kind,
        model_id=model.pk,
        spec_id=spec.pk,
        request={"messages": [{"role": "user", "content": "hi"}]},
        deadline_at=timezone.now() + timedelta(minutes=1),
    )
    return str(job.pk)


def finish(job_id: str, prompt: int, completion: int, *, attempt: int = 1) -> bool:
    job_apply_event(job_id=job_id, attempt=attempt, kind=JobStatus.RUNNING, worker_id="w1", detail={})
    return job_apply_event(
        job_id=job_id,
        attempt=attempt,
        kind=JobStatus.SUCCEEDED,
        worker_id="w1",
        detail={
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
            "result": {"text": "ok", "finish_reason": "stop"},
        },
    )


def rows(key: ApiKey) -> list[dict[str, Any]]:
    return list(
        Usage.objects.filter(api_key=key).values(
            "model", "day", "requests", "prompt_tokens", "completion_tokens", "owner_id"
        )
    )


@pytest.mark.django_db
def test_a_succeeded_job_adds_to_its_keys_row_once(catalog, key) -> None:
    model, spec = catalog
    api_key, _ = key
    first, second = new_job(api_key, model, spec), new_job(api_key, model, spec)
    assert finish(first, 5, 7)
    # The same success delivered again (a redelivered event) moves nothing and counts nothing.
    assert not job_apply_event(
        job_id=first,
        attempt=1,
        kind=JobStatus.SUCCEEDED,
        worker_id="w1",
        detail={"usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}},
    )
    assert finish(second, 3, 2)
    today = timezone.now().date()
    assert rows(api_key) == [
        {
            "model": model.name,
            "day": today,
            "requests": 2,
            "prompt_tokens": 8,
            "completion_tokens": 9,
            "owner_id": api_key.owner_id,
        }
    ]


@pytest.mark.django_db
def test_failed_keyless_and_training_jobs_count_nothing(catalog, key) -> None:
    model, spec = catalog
    api_key, _ = key
    failed = new_job(api_key, model, spec)
    job_apply_event(job_id=failed, attempt=1, kind=JobStatus.RUNNING, worker_id="w1", detail={})
    job_apply_event(
        job_id=failed,
        attempt=1,
        kind=JobStatus.FAILED,
        worker_id="w1",
        detail={
            "error": {"code": "context_length_exceeded", "message": "too long"},
            "usage": {"prompt_tokens": 900, "completion_tokens": 0, "total_tokens": 900},
        },
    )
    keyless = job_create(
        owner_id=api_key.owner_id,
        api_key_id=None,
        kind=JobKind.CHAT,
        model_id=model.pk,
        spec_id=spec.pk,
        request={},
        deadline_at=timezone.now() + timedelta(minutes=1),
    )
    finish(str(keyless.pk), 1, 1)
    training = new_job(api_key, model, spec)  # a training kind (farm.fine_tuning) is not token usage
    Job.objects.filter(pk=training).update(kind="fine_tune", status=JobStatus.SUCCEEDED, finished_at=timezone.now())
    assert not usage_record(job_id=training)
    assert rows(api_key) == []


def usage_event(job_id: str, prompt: int, completion: int, *, attempt: int = 1) -> bool:
    """What a worker sends after aborting a canceled attempt (`gpu_workers.runtime`)."""
    return job_apply_event(
        job_id=job_id,
        attempt=attempt,
        kind="usage",
        worker_id="w1",
        detail={
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        },
    )


@pytest.mark.django_db
def test_a_canceled_job_counts_the_tokens_its_worker_used_once(catalog, key) -> None:
    model, spec = catalog
    api_key, _ = key
    running = new_job(api_key, model, spec)
    job_apply_event(job_id=running, attempt=1, kind=JobStatus.RUNNING, worker_id="w1", detail={})
    assert not usage_event(running, 9, 3)  # not canceled: a usage report moves nothing
    job_cancel(job_id=running, owner_id=api_key.owner_id)
    assert usage_event(running, 9, 3)
    assert not usage_event(running, 9, 3)  # redelivered: counted once
    before_start = new_job(api_key, model, spec)
    job_cancel(job_id=before_start, owner_id=api_key.owner_id)  # never ran: no report, nothing counted
    job = Job.objects.get(pk=running)
    assert (job.status, job.usage) == (
        JobStatus.CANCELED,
        {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
    )
    assert [(e.kind, e.attempt) for e in job.events.order_by("pk")] == [("running", 1), ("canceled", 0), ("usage", 1)]
    assert [(r["requests"], r["prompt_tokens"], r["completion_tokens"]) for r in rows(api_key)] == [(1, 9, 3)]


@pytest.mark.django_db
def test_rows_are_per_model_and_per_day_of_finishing(catalog, key) -> None:
    model, spec = catalog
    api_key, _ = key
    other = model_upsert(name="usage-test-other")
    other_spec = spec_upsert(model=other, name="usage-test-other-spec", engine="vllm-cpu")
    finish(new_job(api_key, model, spec), 1, 1)
    finish(new_job(api_key, other, other_spec), 2, 2)
    yesterday = new_job(api_key, model, spec)
    finish(yesterday, 4, 4)
    # Re-dating a finished job and recording it directly: it lands on its own day's row.
    Job.objects.filter(pk=yesterday).update(finished_at=timezone.now() - timedelta(days=1))
    usage_record(job_id=yesterday)
    today = timezone.now().date()
    got = {(r["model"], r["day"]): (r["requests"], r["prompt_tokens"]) for r in rows(api_key)}
    assert got == {
        (model.name, today): (2, 5),
        (other.name, today): (1, 2),
        (model.name, today - timedelta(days=1)): (1, 4),
    }
    sync_redis().delete(queues.infer_queue("usage-test-other-spec"))


@pytest.mark.django_db(transaction=True)
def test_concurrent_successes_on_a_new_row_lose_no_update(catalog, key) -> None:
    """The first jobs of a day race to insert the row: the unique constraint makes the losers add instead."""
    model, spec = catalog
    api_key, _ = key
    jobs = [new_job(api_key, model, spec) for _ in range(8)]  # 8 threads, 8 connections: the shared PostgreSQL has ~100
    for job_id in jobs:
        job_apply_event(job_id=job_id, attempt=1, kind=JobStatus.RUNNING, worker_id="w1", detail={})
    start = threading.Barrier(len(jobs))
    errors: list[BaseException] = []

    def succeed(job_id: str) -> None:
        try:
            start.wait(timeout=30)
            job_apply_event(
                job_id=job_id,
                attempt=1,
                kind=JobStatus.SUCCEEDED,
                worker_id="w1",
                detail={"usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}},
            )
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()  # this thread's own connection

    threads = [threading.Thread(target=succeed, args=(job_id,)) for job_id in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    [row] = rows(api_key)
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (8, 80, 8)


@pytest.mark.django_db
def test_get_usage_shows_only_the_owners_rows_with_filters(catalog, key) -> None:
    model, _ = catalog
    api_key, raw = key
    second_key, _ = api_key_create(owner=api_key.owner, name="second")
    stranger, stranger_raw = api_key_create(owner=get_user_model().objects.create(username="usage-stranger"))
    today = timezone.now().date()
    for who, day, prompt in (
        (api_key, today, 10),
        (api_key, today - timedelta(days=3), 20),
        (second_key, today, 30),
        (stranger, today, 1000),
    ):
        Usage.objects.create(
            api_key=who,
            owner_id=who.owner_id,
            model=model.name,
            day=day,
            requests=1,
            prompt_tokens=prompt,
            completion_tokens=1,
        )
    Usage.objects.create(
        api_key=api_key,
        owner_id=api_key.owner_id,
        model="another-model",
        day=today,
        requests=2,
        prompt_tokens=5,
        completion_tokens=5,
    )
    client = Client(headers={"Authorization": f"Bearer {raw}"})

    body = client.get("/v1/usage").json()
    assert body["object"] == "list" and body["end_date"] == today.isoformat()
    assert [(r["date"], r["model"], r["api_key"], r["prompt_tokens"]) for r in body["data"]] == [
        ((today - timedelta(days=3)).isoformat(), model.name, api_key.prefix, 20),
        (today.isoformat(), "another-model", api_key.prefix, 5),
        (today.isoformat(), model.name, api_key.prefix, 10),
        (today.isoformat(), model.name, second_key.prefix, 30),
    ]
    assert body["totals"] == {"requests": 5, "prompt_tokens": 65, "completion_tokens": 8, "total_tokens": 73}
    assert body["data"][0]["object"] == "usage.daily" and body["data"][0]["total_tokens"] == 21

    only_today = client.get("/v1/usage", {"start_date": today.isoformat(), "model": model.name}).json()
    assert [r["prompt_tokens"] for r in only_today["data"]] == [10, 30]

    assert (
        client.get("/v1/usage", {"end_date": (today - timedelta(days=1)).isoformat()}).json()["totals"]["prompt_tokens"]
        == 20
    )
    theirs = Client(headers={"Authorization": f"Bearer {stranger_raw}"}).get("/v1/usage").json()
    assert [r["prompt_tokens"] for r in theirs["data"]] == [1000]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"start_date": "yesterday"}, "start_date"),
        ({"end_date": "2026-13-01"}, "end_date"),
        ({"start_date": "2026-02-02", "end_date": "2026-02-01"}, "start_date"),
        ({"start_date": "2020-01-01", "end_date": "2026-01-01"}, "start_date"),
        ({"start_date": "0004-01-01", "end_date": "0001-01-01"}, "start_date"),  # found by fuzzing: was a 500
    ],
)
def test_get_usage_rejects_bad_dates_in_the_openai_shape(key, params: dict[str, str], param: str) -> None:
    _, raw = key
    response = Client(headers={"Authorization": f"Bearer {raw}"}).get("/v1/usage", params)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.django_db
def test_get_usage_at_the_first_representable_day_is_empty_not_an_error(key) -> None:
    _, raw = key
    response = Client(headers={"Authorization": f"Bearer {raw}"}).get("/v1/usage", {"end_date": "0001-01-01"})
    assert response.status_code == 200, response.content
    assert (response.json()["start_date"], response.json()["data"]) == ("0001-01-01", [])


@pytest.mark.django_db
def test_get_usage_needs_a_key() -> None:
    response = Client().get("/v1/usage")
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"


@pytest.mark.django_db
def test_the_admin_lists_usage_read_only(admin_client, key) -> None:
    api_key, _ = key
    Usage.objects.create(
        api_key=api_key,
        owner_id=api_key.owner_id,
        model="admin-model",
        day=timezone.now().date(),
        requests=3,
        prompt_tokens=30,
        completion_tokens=12,
    )
    page = admin_client.get("/admin/farm/usage/")
    assert page.status_code == 200
    assert b"admin-model" in page.content and api_key.prefix.encode() in page.content
    assert admin_client.get("/admin/farm/usage/add/").status_code == 403
    assert admin_client.get("/admin/farm/usage/?model=admin-model").status_code == 200
