"""`GET /api/workers`: the fleet from real heartbeats in Redis (GPU figures from a recorded NVML answer, since this
machine has no GPU), with silent workers shown offline from the database mirror."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from farm import redis_keys
from farm.api_keys import api_key_create
from farm.models import Worker
from farm.redis_client import sync_redis
from farm.registry import registry_invalidate
from gpu_workers.hardware import HardwareReport, read_gpus
from gpu_workers.heartbeat import Heartbeat, loaded_model_entries, queued_messages
from tests.gpu_workers.test_hardware import RecordedNvml

pytestmark = pytest.mark.django_db

IDS = ("api-workers-gpu", "api-workers-stale", "api-workers-gone")


@pytest.fixture
def api_key() -> str:
    _, key = api_key_create(owner=get_user_model().objects.create(username="workers-viewer"), name="t")
    return key


@pytest.fixture(autouse=True)
def clean_registry() -> Iterator[None]:
    yield
    client = sync_redis()
    client.delete(*[redis_keys.worker(i) for i in IDS], "infer.api-workers-spec")
    client.srem(redis_keys.WORKERS_SET, *IDS)
    registry_invalidate()


def get(api_key: str | None, path: str = "/api/workers") -> tuple[int, dict]:
    headers = {"HTTP_AUTHORIZATION": f"Bearer {api_key}"} if api_key else {}
    response = Client().get(path, **headers)
    return response.status_code, response.json()


def test_a_gpu_worker_advertises_its_devices_models_and_load(api_key: str, tiny_model_dir) -> None:
    driver, gpus = read_gpus(RecordedNvml())
    hardware = HardwareReport(
        kind="gpu",
        hostname="gpu-host-1",
        driver=driver,
        gpus=gpus,
        cpu_cores=64,
        memory_total_mib=512 * 1024,
        memory_available_mib=400 * 1024,
        cpu_flags=["avx2"],
    )
    client = sync_redis()
    client.rpush("infer.api-workers-spec", b"m1", b"m2")
    models = loaded_model_entries(
        {"api-workers-spec": {"model": "tiny", "source": str(tiny_model_dir), "engine": "vllm"}},
        model_dir=tiny_model_dir.parent,
        loaded_at=1.0,
    )
    Heartbeat(
        client=client,
        worker_id="api-workers-gpu",
        interval_s=5.0,
        ttl_s=30.0,
        describe=lambda: {
            "hostname": "gpu-host-1",
            "specs": ["api-workers-spec"],
            "status": "ready",
            "running_jobs": [],
            "hardware": hardware.as_dict(),
            "models": models,
            "started_at": time.time() - 60,
            "load": {
                "running": 3,
                "capacity": 8,
                "queued": queued_messages(client, ["infer.api-workers-spec"]),
                "tokens_per_s": 812.5,
            },
        },
    ).beat()
    registry_invalidate()

    status, body = get(api_key)
    assert status == 200 and body["object"] == "list"
    worker = next(w for w in body["data"] if w["id"] == "api-workers-gpu")
    assert (worker["status"], worker["hostname"], worker["specs"]) == ("ready", "gpu-host-1", ["api-workers-spec"])
    h100, t4 = worker["hardware"]["gpus"]
    assert (h100["name"], h100["uuid"], h100["memory_total_mib"], h100["memory_free_mib"]) == (
        "NVIDIA H100 80GB HBM3",
        "GPU-0b9a4c1e-2f7d-4c55-9a1c-3e2d1f0a9b8c",
        80 * 1024,
        60 * 1024,
    )
    assert (h100["utilization_pct"], h100["temperature_c"], h100["power_w"]) == (37, 41, 123.456)
    assert (t4["name"], t4["utilization_pct"], t4["power_w"]) == ("Tesla T4", None, None)
    assert worker["hardware"]["driver"] == "550.54.15"
    assert worker["load"] == {"running": 3, "capacity": 8, "queued": 2, "tokens_per_s": 812.5}
    [model] = worker["models"]
    assert model["spec"] == "api-workers-spec" and model["weights_bytes"] == (
        tiny_model_dir / "model.safetensors"
    ).stat().st_size - _header(tiny_model_dir)
    assert 0 <= worker["heartbeat_age_s"] < 5


def _header(model_dir) -> int:
    """Bytes of the safetensors file that are not tensor data: the 8-byte length and the JSON header."""
    raw = (model_dir / "model.safetensors").read_bytes()[:8]
    return 8 + int.from_bytes(raw, "little")


def test_silent_workers_are_offline(api_key: str) -> None:
    client = sync_redis()
    Heartbeat(
        client=client,
        worker_id="api-workers-stale",
        interval_s=1.0,
        ttl_s=60.0,
        describe=lambda: {"specs": ["x"], "status": "ready", "running_jobs": [], "load": {"running": 0, "capacity": 1}},
    ).beat()
    entry = client.get(redis_keys.worker("api-workers-stale"))
    client.set(redis_keys.worker("api-workers-stale"), entry.replace(b'"ts":', b'"ts":1.0,"old_ts":'), ex=60)
    Worker.objects.create(
        worker_id="api-workers-gone",
        hostname="h",
        status=Worker.Status.OFFLINE,
        specs=["x"],
        last_seen_at=timezone.now() - timedelta(hours=1),
    )
    registry_invalidate()

    status, body = get(api_key)
    assert status == 200
    by_id = {w["id"]: w for w in body["data"]}
    assert by_id["api-workers-stale"]["status"] == "offline"  # three heartbeats missed: offline before its TTL
    assert by_id["api-workers-gone"]["status"] == "offline" and by_id["api-workers-gone"]["models"] == []
    _, live_only = get(api_key, "/api/workers?offline=false")
    assert "api-workers-gone" not in {w["id"] for w in live_only["data"]}


def test_needs_an_api_key() -> None:
    status, body = get(None)
    assert status == 401 and set(body["error"]) == {"message", "type", "param", "code"}


def test_admin_summaries_of_capacity_and_load() -> None:
    from farm.fleet import hardware_summary, load_summary

    _, gpus = read_gpus(RecordedNvml())
    gpu_host = HardwareReport(kind="gpu", hostname="h", gpus=gpus).as_dict()
    assert hardware_summary(gpu_host) == "NVIDIA H100 80GB HBM3 20.0/80 GiB 37% 41°C 123 W; Tesla T4 0.4/15 GiB 30°C"
    cpu_host = HardwareReport(
        kind="cpu", hostname="c", cpu_cores=16, memory_total_mib=65536, cpu_flags=["avx2", "avx512f"]
    ).as_dict()
    assert hardware_summary(cpu_host) == "CPU: 16 cores, 64 GiB RAM (avx2 avx512f)"
    assert load_summary({"running": 3, "capacity": 8, "queued": 2, "tokens_per_s": 812.5}) == (
        "3/8 running, 2 queued, 812 tok/s"
    )
    assert (hardware_summary({}), load_summary({})) == ("-", "-")
