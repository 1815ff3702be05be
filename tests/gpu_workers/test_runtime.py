"""`WorkerRuntime.claim` on real Redis: one winner per job attempt, whatever the number of deliveries."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from farm import redis_keys
from farm.celery_app import create_celery_app
from farm.redis_client import redis_connect, sync_redis
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


def test_a_claim_that_cannot_reach_redis_sends_the_message_back_to_its_queue() -> None:
    """Nothing ran and nothing was reported: the task rejects the message with requeue (Celery would otherwise ack it
    as failed, and the job would wait for the sweeper), and no event is sent."""
    from celery.exceptions import Reject
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from gpu_workers import runtime as runtime_module
    from tasks.inference import generate
    from tests.services import free_port

    host = EngineHost(redis_url=env.REDIS_URL)
    app = create_celery_app(broker_url=env.REDIS_URL, main="farm-worker-test")
    worker = WorkerRuntime(
        worker_id="worker-unreachable", redis_url=env.REDIS_URL, host=host, events=JobEventPublisher(app, "w")
    )
    worker.redis.close()
    worker.redis = redis_connect(f"redis://127.0.0.1:{free_port()}/0", retry=Retry(NoBackoff(), 0))
    sent: list[dict] = []
    worker.events.send = lambda **event: sent.append(event)  # type: ignore[method-assign]
    previous = runtime_module._current
    runtime_module.install(worker)
    try:
        job = message(str(uuid.uuid4()))
        with pytest.raises(Reject) as rejected:
            generate.run(**{name: getattr(job, name) for name in InferenceMessage.__dataclass_fields__})
        assert rejected.value.requeue is True
        assert f"job {job.job_id} attempt 1: claim failed" in str(rejected.value.reason)
        assert sent == [] and worker.running_jobs() == [] and worker.stats.running == 0
    finally:
        runtime_module._current = previous
        worker.redis.close()
        host.close()


def test_a_burst_of_expired_jobs_reports_every_timeout_through_one_writer(runtimes: list[WorkerRuntime]) -> None:
    """A backlog whose deadlines passed together: each job's 504 is written through the engine loop's stream writer.
    Written one pipeline (and pooled connection) per job, 24 of them at once overran a 2-connection pool."""
    import concurrent.futures

    from farm import stream_format
    from farm.redis_client import aioredis_connect
    from farm.stream_format import Failure
    from gpu_workers.stream_writer import StreamWriter

    runtime = runtimes[0]
    host = runtime.host

    async def small_pool():
        return aioredis_connect(env.REDIS_URL, max_connections=2)

    host.run(host.redis.aclose())
    host.redis = host.run(small_pool())  # closed with the host
    host.writer = StreamWriter(host.redis)
    jobs = [str(uuid.uuid4()) for _ in range(24)]
    expired = [
        InferenceMessage(
            job_id=job_id,
            attempt=1,
            spec="tiny-llama-cpu",
            kind="chat.completion",
            request={"messages": [{"role": "user", "content": "hi"}]},
            deadline=time.time() - 1,
        )
        for job_id in jobs
    ]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(expired)) as pool:
        outcomes = list(pool.map(runtime.run_inference, expired))
    assert [outcome.status for outcome in outcomes] == ["timed_out"] * len(jobs)
    client = sync_redis()
    for job_id in jobs:
        [(_, fields)] = client.xrange(redis_keys.job_stream(job_id))
        event = stream_format.decode(fields[stream_format.FIELD.encode()])
        assert isinstance(event, Failure) and (event.status, event.code) == (504, "deadline_exceeded")
        assert 0 < client.ttl(redis_keys.job_stream(job_id)) <= redis_keys.STREAM_TTL_S
        client.delete(redis_keys.job_stream(job_id), redis_keys.job_claim(job_id, 1))
