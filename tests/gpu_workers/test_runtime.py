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
        made.append(
            WorkerRuntime(
                worker_id=worker_id, redis_url=env.REDIS_URL, host=host, events=JobEventPublisher(app, worker_id)
            )
        )
    yield made
    for runtime in made:
        runtime.redis.close()
    host.close()


def message(job_id: str, attempt: int = 1) -> InferenceMessage:
    return InferenceMessage(
        job_id=job_id,
        attempt=attempt,
        spec="tiny-llama-cpu",
        kind="chat.completion",
        request={"messages": [{"role": "user", "content": "hi"}]},
        deadline=time.time() + 60,
    )


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


def test_two_attempts_of_one_job_are_tracked_apart(runtimes: list[WorkerRuntime]) -> None:
    """A requeued job's next attempt may run here while the previous one ends: the job stays listed (the reaper reads
    the list) until both ended. Runs on the zero-cost engine: this is about the runtime's bookkeeping."""
    from pathlib import Path

    from gpu_workers.engine import EngineConfig
    from gpu_workers.engine_pool import EnginePool
    from gpu_workers.null_engine import NullEngine

    runtime = runtimes[0]
    config = EngineConfig(spec_name="tiny-llama-cpu", model_path=Path("/nonexistent"))
    engine = NullEngine(config)
    engine.token_interval_s = 0.05
    runtime.engines = EnginePool(
        configs={config.spec_name: config}, need_bytes={}, budget_bytes=0, load=lambda _: engine, unload=lambda *_: None
    )
    job_id = str(uuid.uuid4())

    def attempt(number: int, tokens: int):
        request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens}
        return runtime.run_inference(
            InferenceMessage(
                job_id=job_id,
                attempt=number,
                spec="tiny-llama-cpu",
                kind="chat.completion",
                request=request,
                deadline=time.time() + 60,
            )
        )

    with ThreadPoolExecutor(max_workers=2) as pool:
        first, second = pool.submit(attempt, 1, 4), pool.submit(attempt, 2, 40)
        assert first.result(timeout=30).status == "succeeded"
        assert not second.done()
        assert runtime.running_jobs() == [job_id]
        assert second.result(timeout=30).status == "succeeded"
    assert runtime.running_jobs() == []
    sync_redis().delete(redis_keys.job_stream(job_id))


def test_a_spec_that_fails_to_load_never_quarantines_the_worker(runtimes: list[WorkerRuntime]) -> None:
    """Each attempt for a broken spec fails retryably (`spec_load_failed`, so the control plane backs the spec off),
    but it is the spec's fault: however many there are, the worker stays ready for its other specs."""
    from pathlib import Path

    from gpu_workers.engine import EngineConfig
    from gpu_workers.engine_pool import EnginePool

    runtime = runtimes[0]
    config = EngineConfig(spec_name="broken-spec", model_path=Path("/nonexistent"))

    def load(_: EngineConfig) -> None:
        raise ValueError("max_model_len too large")

    runtime.engines = EnginePool(
        configs={config.spec_name: config}, need_bytes={}, budget_bytes=0, load=load, unload=lambda *_: None
    )
    outcomes = [
        runtime.run_inference(
            InferenceMessage(
                job_id=str(uuid.uuid4()),
                attempt=1,
                spec="broken-spec",
                kind="chat.completion",
                request={"messages": []},
                deadline=time.time() + 60,
            )
        )
        for _ in range(runtime.quarantine_after + 2)
    ]
    assert {(o.status, o.error["code"], o.error["retry"]) for o in outcomes} == {("failed", "spec_load_failed", True)}
    assert "broken-spec failed to load: ValueError: max_model_len too large" in outcomes[0].error["message"]
    assert runtime.status == "ready" and runtime.stats.consecutive_failures == 0
