"""Overload through the live API: every replica of a model saturated and its queue over the bound -> 429 with
Retry-After in the OpenAI shape, fast (no job is created, nothing waits); no replica -> 503 with Retry-After.

The saturated replica is a registry entry written with the workers' own heartbeat code for a spec that no real
worker consumes, and its queue holds messages nobody takes: the API sees exactly what a busy fleet looks like."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from farm import queues, redis_keys
from farm.redis_client import sync_redis
from gpu_workers.heartbeat import Heartbeat
from settings import env
from tests.conftest import LiveFarm

pytestmark = pytest.mark.live

MODEL, SPEC = "overload-model", "overload-spec"


@pytest.fixture
def busy_model(live_farm: LiveFarm, django_db_blocker, tiny_model_dir) -> Iterator[Heartbeat]:
    from farm.catalog import catalog_load
    from farm.models import Job, Model

    with django_db_blocker.unblock():
        catalog_load({"models": [{"name": MODEL, "source": str(tiny_model_dir), "specs": [{"name": SPEC}]}]})
    client = sync_redis()
    beat = Heartbeat(
        client=client,
        worker_id="overload-worker",
        interval_s=1.0,
        ttl_s=30.0,
        describe=lambda: {
            "specs": [SPEC],
            "status": "ready",
            "running_jobs": [],
            "load": {"running": 4, "capacity": 4},
        },
    )
    beat.beat()
    client.rpush(queues.infer_queue(SPEC), *[b"waiting"] * (env.FARM_OVERLOAD_QUEUE_BOUND + 1))
    time.sleep(5.5)  # the API's catalogue cache (farm.catalog._CACHE_S) learns the new model
    yield beat
    client.delete(queues.infer_queue(SPEC), redis_keys.worker("overload-worker"))
    client.srem(redis_keys.WORKERS_SET, "overload-worker")
    with django_db_blocker.unblock():
        Job.objects.filter(model__name=MODEL).delete()
        Model.objects.filter(name=MODEL).delete()


def chat(http: httpx.Client, model: str = MODEL) -> httpx.Response:
    return http.post(
        "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    )


def p50_ms(samples: list[float]) -> float:
    return sorted(samples)[len(samples) // 2] * 1000


def test_saturated_and_queued_is_429_with_retry_after_fast(
    live_farm: LiveFarm, busy_model: Heartbeat, django_db_blocker
) -> None:
    from farm.models import Job

    http = httpx.Client(
        base_url=live_farm.base_url, headers={"Authorization": f"Bearer {live_farm.api_key}"}, timeout=30
    )
    overloaded, unknown = [], []
    for _ in range(20):
        busy_model.beat()
        started = time.perf_counter()
        response = chat(http)
        overloaded.append(time.perf_counter() - started)
        assert response.status_code == 429, response.text
        assert response.headers["Retry-After"] == str(env.FARM_OVERLOAD_RETRY_AFTER_S)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["code"]) == ("rate_limit_error", "model_overloaded")
        # The same path up to routing (auth, validation, key limits, model lookup), refused before it: the baseline.
        started = time.perf_counter()
        assert chat(http, "no-such-model").status_code == 404
        unknown.append(time.perf_counter() - started)
    print(
        f"\n429 over HTTP: p50 {p50_ms(overloaded):.1f} ms, max {max(overloaded) * 1000:.1f} ms; "
        f"404 of an unknown model (no routing): p50 {p50_ms(unknown):.1f} ms"
    )
    # Answered at once, not after a wait: on an idle machine both take a few ms; on this shared 2-core machine the
    # HTTP stack alone can take longer, so the bar is 50 ms or the no-routing baseline plus 10 ms.
    assert p50_ms(overloaded) < max(50.0, p50_ms(unknown) + 10.0)
    with django_db_blocker.unblock():
        assert not Job.objects.filter(model__name=MODEL).exists()  # refused before any job was created

    sync_redis().delete(redis_keys.worker("overload-worker"))  # the replica is gone: 503, not 429
    sync_redis().srem(redis_keys.WORKERS_SET, "overload-worker")
    deadline = time.monotonic() + 10  # the API's registry snapshot: 1 s, then served stale up to 2 s while re-read
    while (response := chat(http)).status_code == 429 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert response.json()["error"]["code"] == "no_capacity"


def test_a_waiting_key_queues_once_the_backlog_shrinks_and_gets_429_if_it_never_does(
    live_farm: LiveFarm, busy_model: Heartbeat, committed_user
) -> None:
    """`on_limit=wait` applies to an overloaded model too: the request is held (bounded by its own timeout) and
    queued as soon as the model has room; if room never comes, the 429 arrives when the wait is over."""
    import threading

    from farm.api_keys import api_key_create
    from farm.models import Job

    _, raw = api_key_create(owner=committed_user, on_limit="wait")
    http = httpx.Client(base_url=live_farm.base_url, headers={"Authorization": f"Bearer {raw}"}, timeout=30)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    busy_model.beat()
    started = time.monotonic()
    refused = http.post("/v1/chat/completions", json={**body, "timeout": 1.5})
    waited = time.monotonic() - started
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "model_overloaded"
    assert 1.2 <= waited < 5, waited  # held for its timeout (1.5 s), not refused at once
    assert not Job.objects.filter(model__name=MODEL, owner=committed_user).exists()

    def shrink_backlog() -> None:  # two messages leave the queue: it is at its bound, no longer over it
        time.sleep(1.0)
        sync_redis().lpop(queues.infer_queue(SPEC), 2)

    busy_model.beat()
    threading.Thread(target=shrink_backlog).start()
    started = time.monotonic()
    # Accepted once there is room; no worker consumes this spec, so the job then runs into its deadline (504).
    held = http.post("/v1/chat/completions", json={**body, "timeout": 4})
    waited = time.monotonic() - started
    assert held.status_code == 504, held.text
    assert 3.5 <= waited < 10, waited  # the wait counts against the request's own timeout
    job = Job.objects.get(model__name=MODEL, owner=committed_user)
    assert job.deadline_at.timestamp() - job.created_at.timestamp() < 3.5  # created after ~1 s of waiting
