"""Request ids: validation, the log filter, and the Celery header that carries a job's id to its worker (also when
the control plane republishes the job with no request around, e.g. a reaper retry)."""

from __future__ import annotations

import base64
import logging
from datetime import timedelta

import orjson
import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from farm import queues
from farm.catalog import model_upsert, spec_upsert
from farm.jobs import job_create, job_dispatch
from farm.redis_client import sync_redis
from farm.request_ids import (
    CELERY_HEADER,
    RequestIdFilter,
    current_request_id,
    request_id_accept,
    request_id_bound,
)

SPEC = "request-id-test-spec"


@pytest.mark.parametrize("given", ["abc", "a" * 128, "0f8fad5b-d9cb-469f-a165-70867728950e", "span:1.2_x"])
def test_valid_ids_are_kept(given: str) -> None:
    assert request_id_accept(given) == given


@pytest.mark.parametrize("given", [None, "", "a" * 129, "with space", "new\nline", "é", "a;b", "<script>"])
def test_anything_else_gets_a_fresh_id(given: str | None) -> None:
    made = request_id_accept(given)
    assert made.startswith("req_") and len(made) == 36 and made != request_id_accept(given)


def test_log_lines_carry_the_bound_id() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    RequestIdFilter().filter(record)
    assert record.request_id == "-"
    with request_id_bound("req-42"):
        inner = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
        RequestIdFilter().filter(inner)
        assert inner.request_id == "req-42"
    assert current_request_id.get() == ""


def published_headers() -> list[dict]:
    return [orjson.loads(raw)["headers"] for raw in sync_redis().lrange(queues.infer_queue(SPEC), 0, -1)]


def published_kwargs() -> list[dict]:
    bodies = [orjson.loads(raw)["body"] for raw in sync_redis().lrange(queues.infer_queue(SPEC), 0, -1)]
    return [orjson.loads(base64.b64decode(body))[1] for body in bodies]


@pytest.mark.django_db
def test_a_republished_job_carries_its_request_id_to_the_worker() -> None:
    owner = get_user_model().objects.create(username="request-id-owner")
    model = model_upsert(name="request-id-model")
    spec = spec_upsert(model=model, name=SPEC, engine="vllm-cpu")
    sync_redis().delete(queues.infer_queue(SPEC))
    try:
        job = job_create(
            owner_id=owner.pk,
            api_key_id=None,
            kind="chat.completion",
            model_id=model.pk,
            spec_id=spec.pk,
            request={"prompt": "hi"},
            deadline_at=timezone.now() + timedelta(minutes=1),
            request_id="client-trace-7",
        )
        anonymous = job_create(
            owner_id=owner.pk,
            api_key_id=None,
            kind="chat.completion",
            model_id=model.pk,
            spec_id=spec.pk,
            request={"prompt": "hi"},
            deadline_at=timezone.now() + timedelta(minutes=1),
        )
        assert current_request_id.get() == ""  # as in the reaper: no request around
        assert job_dispatch(job_id=str(job.pk)) and job_dispatch(job_id=str(anonymous.pk))
        headers = published_headers()
        # Celery on Redis pushes on the left: newest first.
        assert [h.get(CELERY_HEADER) for h in headers] == [None, "client-trace-7"]
        assert [k["job_id"] for k in published_kwargs()] == [str(anonymous.pk), str(job.pk)]
    finally:
        sync_redis().delete(queues.infer_queue(SPEC))
