"""The cluster overview and the control plane's `/metrics` fleet figures, on real PostgreSQL and Redis: queue depth
and oldest pending age per queue, jobs per state (zeros included), workers and their GPUs from heartbeats."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
import redis
from django.contrib.auth import get_user_model
from django.utils import timezone
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from farm import queues, redis_keys
from farm.catalog import model_upsert, spec_upsert
from farm.cluster import cluster_overview, jobs_by_status, queue_figures
from farm.jobs import job_create, job_dispatch
from farm.metrics import REGISTRY
from farm.models import Job, JobKind, JobStatus, ModelSpec
from farm.redis_client import sync_redis
from gpu_workers.heartbeat import Heartbeat
from settings import env

pytestmark = pytest.mark.django_db

SPEC = "cluster-test-spec"
GPU_WORKER = "cluster-test-gpu-worker"
H100 = {
    "index": 0,
    "name": "NVIDIA H100 80GB HBM3",
    "uuid": "GPU-0",
    "memory_total_mib": 81559,
    "memory_free_mib": 41559,
    "memory_used_mib": 40000,
    "utilization_pct": 75,
    "temperature_c": 60,
    "power_w": 400.0,
}


@pytest.fixture
def spec() -> Iterator[ModelSpec]:
    model = model_upsert(name="cluster-test-model")
    made = spec_upsert(model=model, name=SPEC, engine="vllm", resource_profile="gpu:H100-80GB", min_replicas=2)
    sync_redis().delete(queues.infer_queue(SPEC))
    yield made
    sync_redis().delete(queues.infer_queue(SPEC))


@pytest.fixture
def gpu_worker() -> Iterator[Heartbeat]:
    """A registry entry as a GPU worker writes it (real heartbeat code, NVML figures of a board this host lacks)."""
    heartbeat = Heartbeat(
        client=redis.Redis.from_url(env.REDIS_URL),
        worker_id=GPU_WORKER,
        interval_s=60,
        ttl_s=60,
        describe=lambda: {
            "hostname": "gpu-host",
            "specs": [SPEC],
            "queues": [queues.infer_queue(SPEC)],
            "status": "ready",
            "running_jobs": [],
            "hardware": {"kind": "gpu", "hostname": "gpu-host", "gpus": [H100], "cpu_cores": 64},
            "load": {"running": 2, "capacity": 16, "tokens": 5000, "tokens_per_s": 42.5},
        },
    )
    heartbeat.beat()
    yield heartbeat
    heartbeat.stop()


def queued_job(spec: ModelSpec, *, age_s: float) -> Job:
    owner = get_user_model().objects.get_or_create(username="cluster-owner")[0]
    job = job_create(
        owner_id=owner.pk,
        api_key_id=None,
        kind=JobKind.CHAT,
        model_id=spec.model_id,
        spec_id=spec.pk,
        request={"messages": [{"role": "user", "content": "hi"}]},
        deadline_at=timezone.now() + timedelta(minutes=5),
    )
    job_dispatch(job_id=str(job.pk))
    Job.objects.filter(pk=job.pk).update(dispatched_at=timezone.now() - timedelta(seconds=age_s))
    return job


def test_queue_depth_and_oldest_pending_age(spec: ModelSpec) -> None:
    (empty, control) = queue_figures(spec_names=[SPEC])
    assert (empty.name, empty.depth, empty.oldest_pending_s) == (queues.infer_queue(SPEC), 0, None)
    assert control.name == queues.CONTROL_QUEUE
    queued_job(spec, age_s=30)
    queued_job(spec, age_s=90)
    (figures, _) = queue_figures(spec_names=[SPEC])
    assert figures.depth == 2  # two messages in the broker list
    assert 90 <= figures.oldest_pending_s < 100


def test_jobs_by_status_lists_every_status(spec: ModelSpec) -> None:
    assert jobs_by_status() == dict.fromkeys(JobStatus.values, 0)
    queued_job(spec, age_s=1)
    counts = jobs_by_status()
    assert counts[JobStatus.QUEUED] == 1
    assert set(counts) == set(JobStatus.values)


def test_overview_shows_workers_replicas_and_tokens(spec: ModelSpec, gpu_worker: Heartbeat) -> None:
    overview = cluster_overview()
    (worker,) = [w for w in overview.workers if w.worker_id == GPU_WORKER]
    assert worker.devices[0].memory_used_pct == pytest.approx(100 * 40000 / 81559)
    assert overview.tokens_per_s >= 42.5
    (replicas,) = [r for r in overview.replicas if r.spec == SPEC]
    assert (replicas.ready, replicas.min_replicas, replicas.below_min) == (1, 2, True)


def test_metrics_report_queue_age_job_states_and_gpus(spec: ModelSpec, gpu_worker: Heartbeat) -> None:
    queued_job(spec, age_s=45)
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(REGISTRY).decode())}

    def value(family: str, **labels: str) -> float:
        matches = [s.value for s in families[family].samples if all(s.labels.get(k) == v for k, v in labels.items())]
        assert len(matches) == 1, (family, labels, families[family].samples)
        return matches[0]

    queue = queues.infer_queue(SPEC)
    assert value("farm_queue_depth", queue=queue) == 1
    assert 45 <= value("farm_queue_oldest_pending_seconds", queue=queue) < 60
    assert {s.labels["status"] for s in families["farm_jobs"].samples} == set(JobStatus.values)
    assert value("farm_jobs", status="queued") == 1
    gpu = {"worker": GPU_WORKER, "gpu": "0"}
    assert value("farm_gpu_memory_used_bytes", **gpu) == 40000 * 2**20
    assert value("farm_gpu_memory_total_bytes", **gpu) == 81559 * 2**20
    assert value("farm_gpu_utilization_ratio", **gpu) == pytest.approx(0.75)
    assert value("farm_gpu_temperature_celsius", **gpu) == 60
    assert value("farm_gpu_power_watts", **gpu) == 400
    assert value("farm_worker_tokens_per_second", worker=GPU_WORKER) == 42.5
    assert value("farm_workers", status="ready") >= 1


def test_a_silent_worker_leaves_the_overview(spec: ModelSpec, gpu_worker: Heartbeat) -> None:
    sync_redis().delete(redis_keys.worker(GPU_WORKER))  # its TTL ran out
    assert GPU_WORKER not in {w.worker_id for w in cluster_overview().workers}
