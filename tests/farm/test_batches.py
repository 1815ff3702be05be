"""The batch state machine with real PostgreSQL and Redis, worker events applied through `job_apply_event` (as the
control worker does): validation, the in-flight window, outcomes, resumability, output files, cancel, expiry.
The real engine runs batches in `tests/api/test_batches.py`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from django.contrib.auth import get_user_model
from django.test import TestCase
from django.utils import timezone

from api.openai.batches.lines import batch_line_job, batch_response_body
from farm import queues, redis_keys
from farm.batches import batch_advance, batch_cancel, batch_create, batch_get, batch_line_counts, batch_list
from farm.catalog import model_upsert, spec_upsert
from farm.errors import Conflict, InvalidRequest, NotFound
from farm.files import file_create, file_get, file_iter_lines
from farm.jobs import job_apply_event, job_apply_events
from farm.models import Batch, BatchLine, BatchLineStatus, BatchStatus, Job, JobEvent, JobStatus
from farm.redis_client import sync_redis
from settings import env

pytestmark = pytest.mark.django_db

MODEL = "batch-test-model"
SPEC = "batch-test-spec"
WORKER = "batch-test-worker"


@pytest.fixture
def owner() -> Any:
    return get_user_model().objects.create(username="batch-owner")


@pytest.fixture
def live_spec() -> Iterator[None]:
    """A model whose spec has one live worker in the registry (routing finds it); its queue is emptied after."""
    model = model_upsert(name=MODEL)
    spec_upsert(model=model, name=SPEC, engine="vllm-cpu")
    client = sync_redis()
    entry = {"worker_id": WORKER, "specs": [SPEC], "status": "ready", "load": {"running": 0, "capacity": 8}}
    client.set(redis_keys.worker(WORKER), orjson.dumps(entry), ex=600)
    client.sadd(redis_keys.WORKERS_SET, WORKER)
    yield
    client.delete(redis_keys.worker(WORKER), queues.infer_queue(SPEC))
    client.srem(redis_keys.WORKERS_SET, WORKER)


def lines(n: int, *, url: str = "/v1/chat/completions", model: str = MODEL, start: int = 0) -> bytes:
    def body(i: int) -> dict[str, Any]:
        if url == "/v1/completions":
            return {"model": model, "prompt": f"p{i}", "max_tokens": 3}
        return {"model": model, "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 3}

    return b"".join(
        orjson.dumps({"custom_id": f"c{i}", "method": "POST", "url": url, "body": body(i)}) + b"\n"
        for i in range(start, start + n)
    )


def make_batch(owner: Any, content: bytes, endpoint: str = "/v1/chat/completions", **kwargs: Any) -> Batch:
    file = file_create(owner_id=owner.pk, purpose="batch", filename="in.jsonl", content=content)
    return batch_create(
        owner_id=owner.pk, api_key_id=None, input_file_id=file.id, endpoint=endpoint, completion_window="24h", **kwargs
    )


def tick(batch: Batch) -> str | None:
    """One control-worker tick; its on-commit callbacks (publishing line jobs) run as they would after a commit."""
    with TestCase.captureOnCommitCallbacks(execute=True):
        return batch_advance(batch_id=batch.pk, line_job=batch_line_job, shape_body=batch_response_body)


def finish(job: Job, *, text: str = "ok", fail: dict[str, Any] | None = None) -> None:
    """What a worker's events do to a job: running, then succeeded (or failed)."""
    assert job_apply_event(job_id=str(job.pk), attempt=job.attempt, kind="running", worker_id=WORKER, detail={})
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    if fail:
        detail = {"error": fail, "usage": usage}
        assert job_apply_event(job_id=str(job.pk), attempt=job.attempt, kind="failed", worker_id=WORKER, detail=detail)
        return
    detail = {"result": {"text": text, "finish_reason": "length"}, "usage": usage}
    assert job_apply_event(job_id=str(job.pk), attempt=job.attempt, kind="succeeded", worker_id=WORKER, detail=detail)


def line_jobs(batch: Batch, status: str = JobStatus.QUEUED) -> list[Job]:
    return list(Job.objects.filter(batch_line__batch=batch, status=status).order_by("batch_line__index"))


def records(file_id: str) -> list[dict[str, Any]]:
    return [orjson.loads(raw) for raw in file_iter_lines(file=file_get(file_id=file_id, owner_id=None))]


def test_create_validates_parameters(owner, live_spec) -> None:
    file = file_create(owner_id=owner.pk, purpose="batch", filename="in.jsonl", content=lines(1))
    other = get_user_model().objects.create(username="batch-other")
    common = {"owner_id": owner.pk, "api_key_id": None, "input_file_id": file.id, "completion_window": "24h"}
    with pytest.raises(InvalidRequest) as caught:
        batch_create(**{**common, "endpoint": "/v1/embeddings"})
    assert caught.value.param == "endpoint"
    with pytest.raises(InvalidRequest) as caught:
        batch_create(**{**common, "endpoint": "/v1/chat/completions", "completion_window": "1h"})
    assert caught.value.param == "completion_window"
    with pytest.raises(InvalidRequest) as caught:
        batch_create(**{**common, "endpoint": "/v1/chat/completions", "metadata": {"k": 1}})
    assert caught.value.param == "metadata"
    with pytest.raises(NotFound) as caught:
        batch_create(**{**common, "owner_id": other.pk, "endpoint": "/v1/chat/completions"})
    assert caught.value.param == "input_file_id"
    data = file_create(owner_id=owner.pk, purpose="user_data", filename="x", content=b"x")
    with pytest.raises(InvalidRequest) as caught:
        batch_create(**{**common, "input_file_id": data.id, "endpoint": "/v1/chat/completions"})
    assert caught.value.code == "invalid_file_purpose"


def test_lines_run_as_jobs_and_the_output_is_in_openai_format(owner, live_spec, monkeypatch) -> None:
    monkeypatch.setattr(env, "FARM_BATCH_WINDOW", 3)
    batch = make_batch(owner, lines(5), metadata={"team": "a"})
    assert batch.status == BatchStatus.VALIDATING
    assert tick(batch) == BatchStatus.IN_PROGRESS
    batch.refresh_from_db()
    assert batch.total == 5
    first = line_jobs(batch)
    assert len(first) == 3  # the window
    assert sync_redis().llen(queues.infer_queue(SPEC)) == 3  # published like /v1/chat/completions jobs
    assert first[0].request["messages"] == [{"role": "user", "content": "q0"}]
    assert first[0].kind == "chat.completion"

    finish(first[0], text="zero")
    finish(first[1], fail={"code": "context_length_exceeded", "message": "too long", "retry": False})
    assert tick(batch) == BatchStatus.IN_PROGRESS
    batch.refresh_from_db()
    assert (batch.completed, batch.failed) == (1, 1)
    assert len(line_jobs(batch)) == 3  # topped up: 1 left from before + 2 new
    for job in line_jobs(batch):
        finish(job, text=f"t{job.batch_line.index}")
    assert tick(batch) == BatchStatus.COMPLETED
    batch.refresh_from_db()
    assert (batch.total, batch.completed, batch.failed) == (5, 4, 1)
    assert batch.completed_at and batch.finalizing_at and batch.in_progress_at
    assert batch.usage == {"input_tokens": 20, "output_tokens": 8, "total_tokens": 28}

    output = records(batch.output_file_id)
    assert [r["custom_id"] for r in output] == ["c0", "c2", "c3", "c4"]
    zero = output[0]
    assert set(zero) == {"id", "custom_id", "response", "error"} and zero["error"] is None
    assert zero["id"].startswith("batch_req_")
    assert zero["response"]["status_code"] == 200
    assert zero["response"]["request_id"] == str(first[0].pk)
    body = zero["response"]["body"]
    assert (body["object"], body["model"], body["id"]) == ("chat.completion", MODEL, f"chatcmpl-{first[0].pk}")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "zero", "refusal": None}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    errors = records(batch.error_file_id)
    assert [r["custom_id"] for r in errors] == ["c1"]
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["code"] == "context_length_exceeded"
    assert file_get(file_id=batch.output_file_id, owner_id=owner.pk).purpose == "batch_output"
    assert tick(batch) == BatchStatus.COMPLETED  # idempotent: a late tick changes nothing
    assert Batch.objects.get(pk=batch.pk).output_file_id == batch.output_file_id


def test_completions_endpoint(owner, live_spec) -> None:
    batch = make_batch(owner, lines(2, url="/v1/completions"), endpoint="/v1/completions")
    tick(batch)
    for job in line_jobs(batch):
        assert job.kind == "text_completion" and job.request["prompt"].startswith("p")
        finish(job, text="x")
    assert tick(batch) == BatchStatus.COMPLETED
    batch.refresh_from_db()
    body = records(batch.output_file_id)[0]["response"]["body"]
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "x"
    assert batch.error_file_id == ""


def test_a_finished_line_is_never_run_again(owner, live_spec) -> None:
    """A worker dies: its unfinished line's job is requeued (attempt 2) and runs again; finished lines stay."""
    batch = make_batch(owner, lines(3))
    tick(batch)
    done, lost, _ = line_jobs(batch)
    finish(done)
    assert job_apply_event(job_id=str(lost.pk), attempt=1, kind="running", worker_id=WORKER, detail={})
    tick(batch)
    # The reaper's view of a dead worker: the running attempt goes back to the queue.
    assert job_apply_event(job_id=str(lost.pk), attempt=1, kind="requeue", worker_id=WORKER, detail={})
    lost.refresh_from_db()
    assert (lost.status, lost.attempt) == (JobStatus.QUEUED, 2)
    tick(batch)
    assert BatchLine.objects.get(job=done).status == BatchLineStatus.SUCCEEDED
    for job in line_jobs(batch):
        finish(job)
    assert tick(batch) == BatchStatus.COMPLETED
    assert Job.objects.filter(batch_line__batch=batch).count() == 3  # one job per line, never a second one
    assert JobEvent.objects.filter(job=done, kind="running").count() == 1
    assert JobEvent.objects.filter(job=lost, kind="running").count() == 2


def test_cancel_stops_topping_up_and_cancels_in_flight_lines(owner, live_spec, monkeypatch) -> None:
    monkeypatch.setattr(env, "FARM_BATCH_WINDOW", 2)
    batch = make_batch(owner, lines(5))
    tick(batch)
    first, second = line_jobs(batch)
    finish(first)
    cancelled = batch_cancel(batch_id=batch.pk, owner_id=owner.pk)
    assert cancelled.status == BatchStatus.CANCELLING and cancelled.cancelling_at
    assert batch_cancel(batch_id=batch.pk, owner_id=owner.pk).status == BatchStatus.CANCELLING  # no-op
    assert tick(batch) == BatchStatus.CANCELLED
    second.refresh_from_db()
    assert second.status == JobStatus.CANCELED
    assert Job.objects.filter(batch_line__batch=batch).count() == 2  # nothing new started
    batch.refresh_from_db()
    assert (batch.completed, batch.failed, batch.total) == (1, 0, 5)
    assert [r["custom_id"] for r in records(batch.output_file_id)] == ["c0"]
    errors = records(batch.error_file_id)
    assert [r["custom_id"] for r in errors] == ["c1", "c2", "c3", "c4"]
    assert {r["error"]["code"] for r in errors} == {"batch_cancelled"}
    assert all(r["response"] is None for r in errors)
    assert batch_cancel(batch_id=batch.pk, owner_id=owner.pk).status == BatchStatus.CANCELLED  # still a no-op


def start(job: Job) -> None:
    assert job_apply_event(job_id=str(job.pk), attempt=job.attempt, kind="running", worker_id=WORKER, detail={})


def succeeded_event(job: Job, text: str = "late") -> dict[str, Any]:
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    detail = {"result": {"text": text, "finish_reason": "length"}, "usage": usage}
    return {"job_id": str(job.pk), "attempt": job.attempt, "kind": "succeeded", "worker_id": WORKER, "detail": detail}


def line_status(batch: Batch, custom_id: str) -> str:
    return BatchLine.objects.get(batch=batch, custom_id=custom_id).status


def test_a_line_that_finished_before_the_cancel_reached_its_worker_keeps_its_result(owner, live_spec, monkeypatch):
    monkeypatch.setattr(env, "FARM_BATCH_WINDOW", 2)
    batch = make_batch(owner, lines(3))
    tick(batch)
    first, second = line_jobs(batch)
    start(first)
    start(second)
    batch_cancel(batch_id=batch.pk, owner_id=owner.pk)
    # Both were running: the batch waits for their workers' answers (their lines are collected as cancelled).
    assert tick(batch) == BatchStatus.CANCELLING
    assert line_status(batch, "c0") == BatchLineStatus.CANCELLED
    # The first had finished on its worker: its success (a bulk run of events, as workers send) wins over the cancel.
    assert job_apply_events(events=[succeeded_event(first)]) == 1
    first.refresh_from_db()
    assert (first.status, first.result["text"], first.usage["completion_tokens"]) == (JobStatus.CANCELED, "late", 2)
    assert line_status(batch, "c0") == BatchLineStatus.SUBMITTED
    assert tick(batch) == BatchStatus.CANCELLING  # the second's worker has not answered yet
    # The second was aborted: its worker reports the usage of the attempt, which is its answer.
    aborted = {"usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}
    assert job_apply_event(
        job_id=str(second.pk), attempt=second.attempt, kind="usage", worker_id=WORKER, detail=aborted
    )
    assert tick(batch) == BatchStatus.CANCELLED
    batch.refresh_from_db()
    assert (batch.completed, batch.failed, batch.total) == (1, 0, 3)
    assert batch.usage == {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7}
    output = records(batch.output_file_id)
    assert [(r["custom_id"], r["response"]["body"]["choices"][0]["message"]["content"]) for r in output] == [
        ("c0", "late")
    ]
    assert [(r["custom_id"], r["error"]["code"]) for r in records(batch.error_file_id)] == [
        ("c1", "batch_cancelled"),
        ("c2", "batch_cancelled"),
    ]
    assert JobEvent.objects.filter(job=first, kind="usage", detail__finished_before_cancel=True).exists()


def test_a_cancelled_batch_waits_for_silent_workers_only_for_the_grace(owner, live_spec, monkeypatch) -> None:
    monkeypatch.setattr(env, "FARM_BATCH_WINDOW", 1)
    batch = make_batch(owner, lines(2))
    tick(batch)
    (job,) = line_jobs(batch)
    start(job)
    batch_cancel(batch_id=batch.pk, owner_id=owner.pk)
    assert tick(batch) == BatchStatus.CANCELLING  # its worker may still answer
    monkeypatch.setattr(env, "FARM_BATCH_CANCEL_GRACE_S", 0.0)  # a dead worker never does
    assert tick(batch) == BatchStatus.CANCELLED
    # A success after the batch ended: the job keeps its tokens, the written batch does not change.
    assert job_apply_event(**succeeded_event(job))
    job.refresh_from_db()
    assert (job.status, job.result["text"]) == (JobStatus.CANCELED, "late")
    assert line_status(batch, "c0") == BatchLineStatus.CANCELLED
    batch.refresh_from_db()
    assert not batch.output_file_id and batch.completed == 0


def test_a_late_success_of_a_line_job_cancelled_on_its_own_is_not_a_batch_result(owner, live_spec) -> None:
    batch = make_batch(owner, lines(1))
    tick(batch)
    (job,) = line_jobs(batch)
    start(job)
    Job.objects.filter(pk=job.pk).update(status=JobStatus.CANCELED, error={"code": "canceled", "message": "by user"})
    Batch.objects.filter(pk=batch.pk).update(status=BatchStatus.CANCELLING, cancelling_at=timezone.now())
    assert job_apply_event(**succeeded_event(job))  # its tokens are kept on the job
    assert not job_apply_event(**succeeded_event(job))  # once
    assert tick(batch) == BatchStatus.CANCELLED
    batch.refresh_from_db()
    assert [r["custom_id"] for r in records(batch.error_file_id)] == ["c0"]
    assert line_status(batch, "c0") == BatchLineStatus.CANCELLED


def test_a_finished_batch_cannot_be_cancelled(owner, live_spec) -> None:
    batch = make_batch(owner, lines(1))
    tick(batch)
    finish(line_jobs(batch)[0])
    assert tick(batch) == BatchStatus.COMPLETED
    with pytest.raises(Conflict) as caught:
        batch_cancel(batch_id=batch.pk, owner_id=owner.pk)
    assert caught.value.status == 409


def test_an_expired_batch_ends_expired(owner, live_spec, monkeypatch) -> None:
    monkeypatch.setattr(env, "FARM_BATCH_WINDOW", 1)
    batch = make_batch(owner, lines(3))
    tick(batch)
    finish(line_jobs(batch)[0])
    Batch.objects.filter(pk=batch.pk).update(expires_at=timezone.now())
    assert tick(batch) == BatchStatus.EXPIRED
    batch.refresh_from_db()
    assert batch.expired_at and batch.cancelled_at is None
    assert [r["error"]["code"] for r in records(batch.error_file_id)] == ["batch_expired", "batch_expired"]


def test_validation_failure_lists_the_lines(owner, live_spec) -> None:
    content = lines(2, model="no-such-model") + lines(1, url="/v1/completions", start=2)
    batch = make_batch(owner, content)
    assert tick(batch) == BatchStatus.FAILED
    batch.refresh_from_db()
    data = batch.errors["data"]
    assert [(e["code"], e["line"]) for e in data] == [
        ("invalid_request", 3),
        ("model_not_found", 1),
        ("model_not_found", 2),
    ]
    assert batch.failed_at and not BatchLine.objects.filter(batch=batch).exists()


def test_lines_wait_while_no_worker_serves_the_model(owner, live_spec) -> None:
    client = sync_redis()
    client.delete(redis_keys.worker(WORKER))
    batch = make_batch(owner, lines(2))
    assert tick(batch) == BatchStatus.IN_PROGRESS
    assert batch_line_counts(batch_id=batch.pk) == {BatchLineStatus.PENDING: 2}
    entry = {"worker_id": WORKER, "specs": [SPEC], "status": "ready", "load": {"running": 0, "capacity": 8}}
    client.set(redis_keys.worker(WORKER), orjson.dumps(entry), ex=600)
    tick(batch)
    assert batch_line_counts(batch_id=batch.pk) == {BatchLineStatus.SUBMITTED: 2}


def test_owner_scoping_and_list(owner, live_spec) -> None:
    other = get_user_model().objects.create(username="batch-other")
    made = [make_batch(owner, lines(1)) for _ in range(3)]
    with pytest.raises(NotFound):
        batch_get(batch_id=made[0].pk, owner_id=other.pk)
    with pytest.raises(NotFound):
        batch_cancel(batch_id=made[0].pk, owner_id=other.pk)
    page, more = batch_list(owner_id=owner.pk, limit=2)
    assert [b.pk for b in page] == [made[2].pk, made[1].pk] and more
    page, more = batch_list(owner_id=owner.pk, limit=2, after=page[-1].pk)
    assert [b.pk for b in page] == [made[0].pk] and not more
    assert batch_list(owner_id=other.pk) == ([], False)


def published(spec: str) -> list[dict[str, Any]]:
    """Inference messages waiting in the spec's queue (Celery on Redis: base64 JSON bodies)."""
    import base64

    messages = []
    for raw in sync_redis().lrange(queues.infer_queue(spec), 0, -1):
        _, kwargs, _ = orjson.loads(base64.b64decode(orjson.loads(raw)["body"]))
        messages.append(kwargs)
    return messages


def test_lines_of_a_fine_tuned_model_run_on_its_base_spec_with_the_adapter(owner, live_spec) -> None:
    from farm.models import Model

    base = Model.objects.get(name=MODEL)
    tuned = Model.objects.create(name=f"{MODEL}:ft-abc", base=base, adapter_file_id="file-adapter", owner=owner)
    batch = make_batch(owner, lines(2, model=tuned.name))
    assert tick(batch) == BatchStatus.IN_PROGRESS
    messages = published(SPEC)
    assert len(messages) == 2
    for message in messages:
        assert message["spec"] == SPEC
        adapter = message["adapter"]
        assert (adapter["name"], adapter["lora_id"], adapter["file_id"]) == (tuned.name, tuned.pk, "file-adapter")
        assert adapter["token"]
    assert {job.model_id for job in line_jobs(batch)} == {tuned.pk}


def test_another_users_fine_tuned_model_does_not_exist_for_a_batch(owner, live_spec) -> None:
    from django.contrib.auth import get_user_model

    from farm.models import Model

    someone = get_user_model().objects.create(username="someone-else")
    Model.objects.create(
        name=f"{MODEL}:ft-theirs", base=Model.objects.get(name=MODEL), adapter_file_id="f", owner=someone
    )
    batch = make_batch(owner, lines(1, model=f"{MODEL}:ft-theirs"))
    assert tick(batch) == BatchStatus.FAILED
    batch.refresh_from_db()
    assert [(e["code"], e["line"]) for e in batch.errors["data"]] == [("model_not_found", 1)]


def test_admin_lists_files_and_batches_read_only(admin_client, owner, live_spec) -> None:
    batch = make_batch(owner, lines(1))
    for path in ("/admin/farm/batch/", "/admin/farm/file/", f"/admin/farm/batch/{batch.pk}/change/"):
        response = admin_client.get(path)
        assert response.status_code == 200, path
    assert batch.pk.encode() in admin_client.get("/admin/farm/batch/").content
    assert admin_client.get("/admin/farm/batch/add/").status_code == 403


def test_the_periodic_reap_kicks_every_active_batch(owner) -> None:
    """The safety net for lost kicks, expiry and lines waiting for a worker runs with the reaper (FARM_REAP_EVERY_S)."""
    from tasks.control import reap

    active, done = make_batch(owner, lines(1)), make_batch(owner, lines(1))
    Batch.objects.filter(pk=done.pk).update(status=BatchStatus.COMPLETED)
    client = sync_redis()
    client.delete(*(redis_keys.batch_tick_pending(str(batch.pk)) for batch in (active, done)))

    reap()

    assert client.exists(redis_keys.batch_tick_pending(str(active.pk)))  # a tick is on its way
    assert not client.exists(redis_keys.batch_tick_pending(str(done.pk)))
