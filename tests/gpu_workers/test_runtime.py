"""`WorkerRuntime.claim` on real Redis: one winner per job attempt, whatever the number of deliveries."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from farm import redis_keys
from farm.celery_app import create_celery_app
from farm.redis_client import sync_redis
from gpu_workers.engine_host import EngineHost
from gpu_workers.inference import InferenceMessage
from gpu_workers.job_events import JobEventPublisher
from gpu_workers.runtime import CLAIM_TTL_S, WorkerRuntime
from settings import env


@pytest.fixture
def runtimes() -> Iterator[list[WorkerRuntime]]:
    """Two workers' runtimes on the test Redis, with an engine host that loads no engine."""
    made: list[WorkerRuntime] = []
    host = EngineHost(redis_url=env.REDIS_URL)
    app = create_celery_app(broker_url=env.REDIS_URL, main="farm-worker-test")
    for worker_id in ("worker-a", "worker-b"):
        made.append(WorkerRuntime(worker_id=worker_id, redis_url=env.REDIS_URL, host=host,
                                  events=JobEventPublisher(app, worker_id)))
    yield made
    for runtime in made:
        runtime.redis.close()
    host.close()


def message(job_id: str, attempt: int = 1) -> InferenceMessage:
    return InferenceMessage(job_id=job_id, attempt=attempt, spec="tiny-llama-cpu", kind="chat.completion",
                            request={"messages": [{"role": "user", "content": "hi"}]}, deadline=time.time() + 60)


def test_only_the_first_claim_of_an_attempt_wins(runtimes: list[WorkerRuntime]) -> None:
    a, b = runtimes
    job_id = str(uuid.uuid4())
    assert a.claim(message(job_id)) is True
    assert b.claim(message(job_id)) is False
    assert a.claim(message(job_id)) is False  # a redelivery to the winner loses too
    key = redis_keys.job_claim(job_id, 1)
    assert sync_redis().get(key) == b"worker-a"
    assert 0 < sync_redis().ttl(key) <= CLAIM_TTL_S


def test_another_attempt_of_the_same_job_can_be_claimed(runtimes: list[WorkerRuntime]) -> None:
    a, b = runtimes
    job_id = str(uuid.uuid4())
    assert a.claim(message(job_id, attempt=1))
    assert b.claim(message(job_id, attempt=2))
    assert not a.claim(message(job_id, attempt=2))
    assert a.claim(message(str(uuid.uuid4()), attempt=1))  # other jobs are independent


def test_concurrent_deliveries_have_exactly_one_winner(runtimes: list[WorkerRuntime]) -> None:
    job_id = str(uuid.uuid4())
    with ThreadPoolExecutor(max_workers=16) as pool:
        wins = list(pool.map(lambda i: runtimes[i % 2].claim(message(job_id)), range(64)))
    assert wins.count(True) == 1
