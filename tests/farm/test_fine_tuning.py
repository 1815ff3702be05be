"""Fine-tuning services on real PostgreSQL and Redis: hyperparameter validation, job-scoped tokens and the worker I/O
endpoints they open, job dependencies (release, cascade, reaper safety net), and the registration of the fine-tuned
model on success. The live end-to-end run is `tests/api/test_fine_tuning.py`."""

from __future__ import annotations

import base64
import io
import tarfile
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import orjson
import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from farm import jobs, queues
from farm.api_keys import api_key_create
from farm.errors import InvalidRequest, Unauthenticated
from farm.files import file_create
from farm.fine_tuning import (
    fine_tune_create,
    fine_tune_finish,
    fine_tuned_model_name,
    hyperparameters_resolve,
    job_id_parse,
)
from farm.job_tokens import Forbidden, job_token_mint, job_token_verify
from farm.models import FilePurpose, Job, JobEvent, JobKind, JobStatus, Model
from farm.redis_client import sync_redis

pytestmark = pytest.mark.django_db

CHAT_LINE = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.fixture
def owner():
    return get_user_model().objects.create(username=f"ft-owner-{uuid.uuid4().hex[:6]}")


@pytest.fixture
def base_model() -> Model:
    return Model.objects.create(name=f"base-{uuid.uuid4().hex[:6]}", source="no-such-dir")


@pytest.fixture
def train_file(owner):
    return file_create(
        owner_id=owner.pk,
        purpose=FilePurpose.FINE_TUNE,
        filename="t.jsonl",
        content=b"\n".join(orjson.dumps(CHAT_LINE) for _ in range(20)) + b"\n",
    )


@pytest.fixture
def queue_class() -> Iterator[str]:
    """A hardware class no worker consumes: the test reads what was published to it."""
    name = f"ut-{uuid.uuid4().hex[:8]}"
    yield name
    sync_redis().delete(queues.train_queue(name))


def published(queue_class: str) -> list[str]:
    """Job ids of the messages published to `train.<queue_class>`, oldest first (kombu LPUSHes)."""
    ids = []
    for raw in reversed(sync_redis().lrange(queues.train_queue(queue_class), 0, -1)):
        body = orjson.loads(base64.b64decode(orjson.loads(raw)["body"]))  # [args, kwargs, embed]
        ids.append(body[1]["job_id"])
    return ids


def eval_job(owner, model: Model, queue_class: str, depends_on: list[Job] | None = None) -> Job:
    return jobs.job_create(
        owner_id=owner.pk,
        api_key_id=None,
        kind=JobKind.EVAL_LOSS,
        model_id=model.pk,
        spec_id=None,
        request={
            "model": model.name,
            "file": "file-x",
            "batch_size": 1,
            "max_seq_len": 16,
            "base_source": "x",
            "base_model": model.name,
            "hardware_class": queue_class,
        },
        deadline_at=timezone.now() + timedelta(hours=1),
        depends_on=[str(d.pk) for d in depends_on or []],
    )


# --- hyperparameters ------------------------------------------------------------------------------------------------


def test_auto_hyperparameters_follow_the_data_size() -> None:
    small = hyperparameters_resolve(None, examples=10)
    assert (small.n_epochs, small.batch_size, small.learning_rate_multiplier, small.lora_rank) == (10, 1, 1.0, 8)
    big = hyperparameters_resolve({"n_epochs": "auto", "batch_size": 16}, examples=5000)
    assert (big.n_epochs, big.batch_size) == (3, 16)


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ({"n_epochs": 0}, "hyperparameters.n_epochs"),
        ({"n_epochs": 51}, "hyperparameters.n_epochs"),
        ({"n_epochs": True}, "hyperparameters.n_epochs"),
        ({"batch_size": 1.5}, "hyperparameters.batch_size"),
        ({"batch_size": "8"}, "hyperparameters.batch_size"),
        ({"learning_rate_multiplier": 0}, "hyperparameters.learning_rate_multiplier"),
        ({"lora_rank": 65}, "hyperparameters.lora_rank"),
        ({"lora_dropout": 1.0}, "hyperparameters.lora_dropout"),
        ({"epochs": 3}, "hyperparameters.epochs"),
    ],
)
def test_bad_hyperparameters_are_a_400_naming_them(raw: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        hyperparameters_resolve(raw, examples=10)
    assert error.value.param == param


def test_job_ids_parse_with_or_without_the_prefix() -> None:
    job_id = uuid.uuid4()
    assert job_id_parse(f"ftjob-{job_id.hex}") == job_id_parse(str(job_id)) == str(job_id)
    with pytest.raises(Exception, match="No job"):
        job_id_parse("ftjob-nope")


# --- tokens and worker I/O ----------------------------------------------------------------------------------------


def test_a_token_grants_its_own_live_attempt_only(owner, base_model, queue_class) -> None:
    job = eval_job(owner, base_model, queue_class)
    other = eval_job(owner, base_model, queue_class)
    token = job_token_mint(job_id=str(job.pk), attempt=1)
    assert job_token_verify(token=token, job_id=str(job.pk)).job.pk == job.pk
    with pytest.raises(Forbidden):
        job_token_verify(token=token, job_id=str(other.pk))
    with pytest.raises(Unauthenticated):
        job_token_verify(token=token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1])
    with pytest.raises(Unauthenticated):
        job_token_verify(token="farm-not-a-job-token")
    jobs.job_transition(job_id=str(job.pk), attempt=1, to=JobStatus.RUNNING, worker_id="w")
    assert jobs.job_requeue(job_id=str(job.pk), attempt=1, reason="test").attempt == 2
    with pytest.raises(Forbidden):  # the attempt it was minted for is over
        job_token_verify(token=token)
    token2 = job_token_mint(job_id=str(job.pk), attempt=2)
    job_token_verify(token=token2)
    jobs.job_cancel(job_id=str(job.pk), owner_id=owner.pk)
    with pytest.raises(Forbidden):  # and a finished job grants nothing
        job_token_verify(token=token2)


def adapter_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in (("adapter_config.json", b"{}"), ("adapter_model.safetensors", b"x" * 100)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_worker_io_endpoints_and_the_fine_tuned_model(owner, base_model, train_file, settings) -> None:
    other_file = file_create(
        owner_id=owner.pk, purpose=FilePurpose.FINE_TUNE, filename="o.jsonl", content=orjson.dumps(CHAT_LINE)
    )
    job = fine_tune_create(
        owner_id=owner.pk,
        api_key_id=None,
        model=base_model.name,
        training_file=train_file.pk,
        hyperparameters={"n_epochs": 1},
    )
    assert job.request["hardware_class"] == "cpu"  # its weights are not readable here: CPU, with a warning
    client = Client()
    token = job_token_mint(job_id=str(job.pk), attempt=1)
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    url = f"/api/jobs/{job.pk}/files/{train_file.pk}/content"
    response = client.get(url, **auth)
    assert (
        response.status_code == 200
        and b"".join(response.streaming_content) == b"\n".join(orjson.dumps(CHAT_LINE) for _ in range(20)) + b"\n"
    )
    assert client.get(f"/api/jobs/{job.pk}/files/{other_file.pk}/content", **auth).status_code == 404
    _, api_key = api_key_create(owner=owner, name="k")
    assert client.get(url, HTTP_AUTHORIZATION=f"Bearer {api_key}").status_code == 200  # the owner's own data
    stranger = get_user_model().objects.create(username=f"stranger-{uuid.uuid4().hex[:6]}")
    _, stranger_key = api_key_create(owner=stranger, name="k")
    assert client.get(url, HTTP_AUTHORIZATION=f"Bearer {stranger_key}").status_code == 404
    refused = client.get(url, HTTP_AUTHORIZATION="Bearer fjt-forged")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_job_token"
    assert client.get("/api/jobs/not-a-uuid/adapter", **auth).status_code == 404
    upload = client.post(
        "/api/job-artifacts", {"name": "adapter", "file": io.BytesIO(b"x")}, HTTP_AUTHORIZATION=f"Bearer {api_key}"
    )
    assert upload.status_code == 401  # artifacts come from the job's worker only
    other_job = fine_tune_create(owner_id=owner.pk, api_key_id=None, model=base_model.name, training_file=train_file.pk)
    response = client.get(f"/api/jobs/{other_job.pk}/files/{train_file.pk}/content", **auth)
    assert response.status_code == 403 and set(response.json()["error"]) == {"message", "type", "param", "code"}

    upload = {"name": "adapter", "file": io.BytesIO(adapter_tar())}
    assert client.post("/api/job-artifacts", upload, **auth).status_code == 400  # not running yet
    jobs.job_transition(job_id=str(job.pk), attempt=1, to=JobStatus.RUNNING, worker_id="w")
    # Success without an uploaded adapter is not a success.
    assert fine_tune_finish(job_id=str(other_job.pk), attempt=1, worker_id="w", detail={}) is True
    other_job.refresh_from_db()
    assert (other_job.status, other_job.error["code"]) == (JobStatus.FAILED, "artifact_missing")

    response = client.post("/api/job-artifacts", {"name": "adapter", "file": io.BytesIO(adapter_tar())}, **auth)
    assert response.status_code == 200, response.content
    file_id = response.json()["file_id"]
    assert client.post("/api/job-artifacts", {"name": "weights", "file": io.BytesIO(b"x")}, **auth).status_code == 400
    assert jobs.job_apply_event(
        job_id=str(job.pk),
        attempt=1,
        kind=JobStatus.SUCCEEDED,
        worker_id="w",
        detail={"result": {"trained_tokens": 40, "adapter_file_id": "file-forged"}},
    )
    job.refresh_from_db()
    name = fine_tuned_model_name(base=base_model.name, job_id=str(job.pk))
    assert job.status == JobStatus.SUCCEEDED
    assert job.result["fine_tuned_model"] == name and job.result["adapter_file_id"] == file_id  # the API's record
    tuned = Model.objects.get(name=name)
    assert (tuned.base_id, tuned.adapter_file_id, tuned.owned_by) == (base_model.pk, file_id, owner.username)
    assert client.get(url, **auth).status_code == 403  # the attempt is over

    # An inference job on the fine-tuned model gets its adapter with its own token, nothing else.
    chat = jobs.job_create(
        owner_id=owner.pk,
        api_key_id=None,
        kind=JobKind.CHAT,
        model_id=tuned.pk,
        spec_id=None,
        request={},
        deadline_at=timezone.now() + timedelta(minutes=1),
    )
    chat_auth = {"HTTP_AUTHORIZATION": f"Bearer {job_token_mint(job_id=str(chat.pk), attempt=1)}"}
    response = client.get(f"/api/jobs/{chat.pk}/adapter", **chat_auth)
    assert response.status_code == 200 and b"".join(response.streaming_content) == adapter_tar()
    assert client.get(f"/api/jobs/{chat.pk}/files/{train_file.pk}/content", **chat_auth).status_code == 404


# --- dependencies ---------------------------------------------------------------------------------------------------


def test_a_chain_starts_in_order_and_a_failure_cascades(
    owner, base_model, queue_class, django_capture_on_commit_callbacks
) -> None:
    a = eval_job(owner, base_model, queue_class)
    b = eval_job(owner, base_model, queue_class, depends_on=[a])
    c = eval_job(owner, base_model, queue_class, depends_on=[b])
    d = eval_job(owner, base_model, queue_class, depends_on=[c, a])
    assert jobs.job_dispatch(job_id=str(a.pk)) is True
    assert jobs.job_dispatch(job_id=str(b.pk)) is False  # waits for a
    assert published(queue_class) == [str(a.pk)]
    assert Job.objects.get(pk=b.pk).dispatched_at is None

    with django_capture_on_commit_callbacks(execute=True):
        jobs.job_apply_event(job_id=str(a.pk), attempt=1, kind="running", worker_id="w", detail={})
    assert published(queue_class) == [str(a.pk)]  # running is not done
    with django_capture_on_commit_callbacks(execute=True):
        jobs.job_apply_event(
            job_id=str(a.pk), attempt=1, kind="succeeded", worker_id="w", detail={"result": {"loss": 1.0}}
        )
    assert published(queue_class) == [str(a.pk), str(b.pk)]  # b released; c still waits on b
    assert Job.objects.get(pk=c.pk).status == JobStatus.QUEUED

    with django_capture_on_commit_callbacks(execute=True):
        jobs.job_apply_event(job_id=str(b.pk), attempt=1, kind="running", worker_id="w", detail={})
        jobs.job_apply_event(
            job_id=str(b.pk),
            attempt=1,
            kind="failed",
            worker_id="w",
            detail={"error": {"code": "invalid_training_data", "message": "bad", "retry": False}},
        )
    for dependent, culprit in ((c, b), (d, c)):  # c fails because of b, then d because of c
        dependent.refresh_from_db()
        assert dependent.status == JobStatus.FAILED and dependent.error["code"] == "dependency_failed"
        assert str(culprit.pk) in dependent.error["message"] and dependent.started_at is None
    assert published(queue_class) == [str(a.pk), str(b.pk)]


def test_progress_events_are_history_of_the_running_attempt_only(owner, base_model, queue_class) -> None:
    job = eval_job(owner, base_model, queue_class)
    assert not jobs.job_apply_event(
        job_id=str(job.pk), attempt=1, kind="progress", worker_id="w", detail={"step": 1}
    )  # not running yet
    jobs.job_transition(job_id=str(job.pk), attempt=1, to=JobStatus.RUNNING, worker_id="w")
    assert jobs.job_apply_event(
        job_id=str(job.pk), attempt=1, kind="progress", worker_id="w", detail={"step": 1, "train_loss": 2.5}
    )
    assert not jobs.job_apply_event(job_id=str(job.pk), attempt=2, kind="progress", worker_id="w", detail={})
    job.refresh_from_db()
    assert job.status == JobStatus.RUNNING
    assert list(JobEvent.objects.filter(job=job, kind="progress").values_list("detail", flat=True)) == [
        {"step": 1, "train_loss": 2.5}
    ]


def test_the_reaper_releases_a_job_whose_release_was_lost(owner, base_model, queue_class) -> None:
    from farm.reaper import jobs_reap

    a = eval_job(owner, base_model, queue_class)
    b = eval_job(owner, base_model, queue_class, depends_on=[a])
    Job.objects.filter(pk=a.pk).update(status=JobStatus.SUCCEEDED)  # its after-commit release never ran
    report = jobs_reap()
    assert str(b.pk) in report.republished and published(queue_class) == [str(b.pk)]
    assert jobs_reap().republished == []  # dispatched now: not again
