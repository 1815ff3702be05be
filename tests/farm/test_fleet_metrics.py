"""Scale-up signals on /metrics: pending over two minutes, live replicas and back-off per spec (real DB and Redis)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone
from prometheus_client import generate_latest

from farm import queues, redis_keys
from farm.catalog import model_upsert, spec_upsert
from farm.jobs import job_create
from farm.metrics import REGISTRY
from farm.models import Job, JobKind
from farm.redis_client import sync_redis
from farm.spec_health import spec_backoff_clear, spec_failure_record
from gpu_workers.heartbeat import Heartbeat

pytestmark = pytest.mark.django_db

SPEC, IDLE = "signals-spec", "signals-idle"


@pytest.fixture
def spec() -> Iterator[None]:
    model = model_upsert(name="signals-model", source="w")
    spec = spec_upsert(model=model, name=SPEC, engine="vllm")
    spec_upsert(model=model, name=IDLE, engine="vllm-cpu", weight=0, min_replicas=1)
    owner = get_user_model().objects.create(username="signals")
    for waited in (180, 150, 10):
        job = job_create(
            owner_id=owner.pk,
            api_key_id=None,
            kind=JobKind.CHAT,
            model_id=model.pk,
            spec_id=spec.pk,
            request={},
            deadline_at=timezone.now() + timedelta(minutes=10),
        )
        Job.objects.filter(pk=job.pk).update(dispatched_at=timezone.now() - timedelta(seconds=waited))
    sync_redis().delete(queues.infer_queue(SPEC), queues.infer_queue(IDLE))
    sync_redis().rpush(queues.infer_queue(SPEC), b"m1", b"m2")
    sync_redis().rpush(queues.infer_queue(IDLE), b"m3")
    Heartbeat(
        client=sync_redis(),
        worker_id="signals-worker",
        interval_s=1.0,
        ttl_s=30.0,
        describe=lambda: {
            "specs": [SPEC],
            "status": "ready",
            "running_jobs": [],
            "load": {"running": 1, "capacity": 4},
        },
    ).beat()
    yield
    sync_redis().delete(redis_keys.worker("signals-worker"))
    sync_redis().srem(redis_keys.WORKERS_SET, "signals-worker")
    spec_backoff_clear()
    sync_redis().delete(queues.infer_queue(SPEC), queues.infer_queue(IDLE))


def scrape() -> dict[str, float]:
    values = {}
    for line in generate_latest(REGISTRY).decode().splitlines():
        if line.startswith(("farm_spec_", "farm_model_")):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_scale_up_signals_per_spec(spec: None) -> None:
    spec_failure_record(spec=SPEC, reason="test")
    values = scrape()
    assert values[f'farm_spec_pending_over_2m{{spec="{SPEC}"}}'] == 2.0  # 180 s and 150 s; not the 10 s one
    assert values[f'farm_spec_pending_over_2m{{spec="{IDLE}"}}'] == 0.0
    assert values[f'farm_spec_live_replicas{{spec="{SPEC}"}}'] == 1.0
    assert values[f'farm_spec_live_replicas{{spec="{IDLE}"}}'] == 0.0
    assert 0.0 < values[f'farm_spec_backoff_seconds{{spec="{SPEC}"}}'] <= 2.0
    # The model's demand over its specs: what scales a spec up from zero replicas.
    assert values['farm_model_queue_depth{model="signals-model"}'] == 3.0
    assert values['farm_model_pending_over_2m{model="signals-model"}'] == 2.0
