"""Model cache jobs: `POST /v1/models/{model}/cache` queues a job on the control queue; the task copies a local model
directory into the model store with byte progress (real files, real Redis and PostgreSQL); permissions; failures."""

from __future__ import annotations

import filecmp
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from farm import queues, redis_keys
from farm.api_keys import api_key_create
from farm.catalog import model_upsert
from farm.model_cache import model_cache_run
from farm.models import ApiKey
from farm.redis_client import sync_redis
from gpu_workers.model_store import is_model_ready

pytestmark = pytest.mark.django_db

MODEL = "cache-test-model"


@pytest.fixture
def model_dir(tmp_path: Path, monkeypatch) -> Iterator[Path]:
    from settings import env

    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setattr(env, "FARM_MODEL_DIR", store)
    sync_redis().delete(redis_keys.MODEL_CACHE_JOBS, queues.CONTROL_QUEUE)
    yield store
    sync_redis().delete(redis_keys.MODEL_CACHE_JOBS, queues.CONTROL_QUEUE)


def key(*, staff: bool = False, models: list[str] | None = None) -> str:
    owner = get_user_model().objects.create(username=f"cache-{staff}-{models}", is_staff=staff)
    api_key, raw = api_key_create(owner=owner, name="t")
    if models is not None:
        ApiKey.objects.filter(pk=api_key.pk).update(allowed_models=models)
    return raw


def call(method: str, path: str, api_key: str, body: dict | None = None) -> tuple[int, dict]:
    client = Client()
    headers = {"HTTP_AUTHORIZATION": f"Bearer {api_key}"}
    if method == "POST":
        response = client.post(path, data=orjson.dumps(body or {}), content_type="application/json", **headers)
    else:
        response = client.get(path, **headers)
    return response.status_code, response.json()


def queued_tasks() -> list[dict]:
    messages = [orjson.loads(raw) for raw in sync_redis().lrange(queues.CONTROL_QUEUE, 0, -1)]
    return [m["headers"] for m in messages if m["headers"]["task"] == queues.MODEL_CACHE_TASK.name]


def test_a_local_model_directory_is_copied_into_the_store(model_dir: Path, tiny_model_dir: Path) -> None:
    model_upsert(name=MODEL, source=str(tiny_model_dir))
    staff = key(staff=True)
    status, job = call("POST", f"/v1/models/{MODEL}/cache", staff, {"target": "tiny-copy"})
    assert status == 202, job
    assert (job["object"], job["status"], job["source"], job["target"]) == (
        "model.cache_job",
        "queued",
        str(tiny_model_dir),
        "tiny-copy",
    )
    assert len(queued_tasks()) == 1  # published to the control worker

    done = model_cache_run(job_id=job["id"])  # what the control worker's task runs
    assert done["status"] == "succeeded" and done["progress"] == 1.0
    total = sum(p.stat().st_size for p in tiny_model_dir.iterdir() if p.is_file() and p.name != ".farm-ready")
    assert done["bytes_done"] == done["bytes_total"] == total
    copy = model_dir / "tiny-copy"
    assert is_model_ready(copy)
    assert filecmp.cmp(copy / "model.safetensors", tiny_model_dir / "model.safetensors", shallow=False)
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".")]  # no temporary directory left

    status, fetched = call("GET", f"/v1/models/{MODEL}/cache/{job['id']}", staff)
    assert status == 200 and fetched["status"] == "succeeded"
    status, listing = call("GET", f"/v1/models/{MODEL}/cache", staff)
    assert [j["id"] for j in listing["data"]] == [job["id"]]
    assert model_cache_run(job_id=job["id"])["status"] == "succeeded"  # a redelivered message changes nothing


def test_a_key_scoped_to_the_model_may_cache_it_others_may_not(model_dir: Path, tiny_model_dir: Path) -> None:
    model_upsert(name=MODEL, source=str(tiny_model_dir))
    status, body = call("POST", f"/v1/models/{MODEL}/cache", key())
    assert status == 403 and body["error"]["type"] == "permission_error"
    status, body = call("POST", f"/v1/models/{MODEL}/cache", key(models=["another-model"]))
    assert status == 403
    status, body = call("POST", f"/v1/models/{MODEL}/cache", key(models=[MODEL]))
    assert status == 202, body


def test_unreachable_hub_and_missing_paths_fail_with_their_reason(model_dir: Path) -> None:
    model_upsert(name=MODEL, source="")
    staff = key(staff=True)
    status, body = call("POST", f"/v1/models/{MODEL}/cache", staff)
    assert (status, body["error"]["code"], body["error"]["param"]) == (400, "missing_source", "source")
    status, body = call("POST", f"/v1/models/{MODEL}/cache", staff, {"source": "x", "target": "../escape"})
    assert (status, body["error"]["param"]) == (400, "target")
    status, body = call("POST", "/v1/models/no-such-model/cache", staff)
    assert (status, body["error"]["code"]) == (404, "model_not_found")

    _, missing = call("POST", f"/v1/models/{MODEL}/cache", staff, {"source": "/nonexistent/weights"})
    failed = model_cache_run(job_id=missing["id"])
    assert failed["status"] == "failed" and "does not exist" in failed["error"]["message"]

    # A hub id: this machine has no route to the hub, so the job fails and says why (offline mode is honoured).
    _, hub = call("POST", f"/v1/models/{MODEL}/cache", staff, {"source": "HuggingFaceTB/SmolLM2-135M-Instruct"})
    assert hub["target"] == MODEL
    failed = model_cache_run(job_id=hub["id"])
    assert failed["status"] == "failed" and failed["error"]["message"]
    assert not (model_dir / MODEL).exists()
