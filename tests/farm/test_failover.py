"""Failover between specs (farm.failover), shared back-off (farm.spec_health) and overload (farm.inference), on the
real PostgreSQL and Redis: worker heartbeats are written by the workers' own `Heartbeat` class."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from farm import queues, redis_keys
from farm.catalog import ModelEntry, SpecEntry, catalog_load
from farm.errors import ModelOverloaded, Unavailable
from farm.failover import job_failover_dispatch, jobs_failover_queued
from farm.inference import spec_choose
from farm.jobs import job_apply_event, job_create
from farm.models import Job, JobEvent, JobKind, JobStatus, ModelSpec
from farm.redis_client import sync_redis
from farm.registry import registry_invalidate
from farm.spec_health import backoffs_invalidate, spec_backoff_clear, spec_backoffs_sync, spec_failure_record
from gpu_workers.heartbeat import Heartbeat

pytestmark = pytest.mark.django_db

MODEL = "failover-model"
SPEC_A, SPEC_B, SPEC_STANDBY = "failover-a", "failover-b", "failover-standby"
SPECS = (SPEC_A, SPEC_B, SPEC_STANDBY)


@pytest.fixture
def fleet() -> Iterator[dict[str, ModelSpec]]:
    client = sync_redis()
    client.delete(*[queues.infer_queue(s) for s in SPECS])
    spec_backoff_clear()
    catalog_load(
        {
            "models": [
                {
                    "name": MODEL,
                    "source": "tiny",
                    "specs": [
                        {"name": SPEC_A, "engine": "vllm", "weight": 100},
                        {"name": SPEC_B, "engine": "vllm", "weight": 100},
                        {"name": SPEC_STANDBY, "engine": "vllm-cpu", "weight": 0, "min_replicas": 1},
                    ],
                }
            ]
        }
    )
    yield {spec.name: spec for spec in ModelSpec.objects.filter(name__in=SPECS)}
    for worker_id in [w.decode() for w in client.smembers(redis_keys.WORKERS_SET)]:
        if worker_id.startswith("fo-"):
            client.delete(redis_keys.worker(worker_id))
            client.srem(redis_keys.WORKERS_SET, worker_id)
    client.delete(*[queues.infer_queue(s) for s in SPECS])
    spec_backoff_clear()
    registry_invalidate()


def serve(
    worker_id: str, *specs: str, running: int = 0, capacity: int = 4, status: str = "ready", invalidate: bool = True
) -> Heartbeat:
    """A worker's registry entry, written by the workers' own heartbeat code; the API's cached snapshot of the
    registry is dropped unless `invalidate` is False."""
    beat = Heartbeat(
        client=sync_redis(),
        worker_id=worker_id,
        interval_s=1.0,
        ttl_s=30.0,
        describe=lambda: {
            "specs": list(specs),
            "status": status,
            "running_jobs": [],
            "load": {"running": running, "capacity": capacity},
        },
    )
    beat.beat()
    if invalidate:
        registry_invalidate()
    return beat


def queued_job(spec: ModelSpec, *, waited_s: float = 10.0) -> Job:
    owner = get_user_model().objects.create(username=f"fo-{time.monotonic_ns()}")
    job = job_create(
        owner_id=owner.pk,
        api_key_id=None,
        kind=JobKind.CHAT,
        model_id=spec.model_id,
        spec_id=spec.pk,
        request={"messages": [{"role": "user", "content": "hi"}]},
        deadline_at=timezone.now() + timedelta(minutes=5),
    )
    Job.objects.filter(pk=job.pk).update(dispatched_at=timezone.now() - timedelta(seconds=waited_s))
    return job


def queue_len(spec: str) -> int:
    return sync_redis().llen(queues.infer_queue(spec))


def test_a_job_stranded_on_a_dead_spec_moves_to_a_live_one(fleet: dict[str, ModelSpec]) -> None:
    serve("fo-b", SPEC_B)
    job = queued_job(fleet[SPEC_A])
    fresh = queued_job(fleet[SPEC_A], waited_s=0.0)  # not waited long enough yet

    moved = jobs_failover_queued(now=timezone.now(), after_s=2.0)

    assert moved == [str(job.pk)]
    job.refresh_from_db()
    assert (job.status, job.attempt, job.spec.name) == (JobStatus.QUEUED, 2, SPEC_B)
    assert queue_len(SPEC_B) == 1
    # The message left in the dead spec's queue can never run: its attempt's claim is taken.
    assert sync_redis().get(redis_keys.job_claim(str(job.pk), 1)) == b"failover"
    assert JobEvent.objects.filter(job=job, kind="failover", detail__spec=SPEC_B).exists()
    assert Job.objects.get(pk=fresh.pk).spec.name == SPEC_A


def test_a_stranded_job_already_claimed_by_a_worker_is_left_to_the_reaper(fleet: dict[str, ModelSpec]) -> None:
    serve("fo-b", SPEC_B)
    job = queued_job(fleet[SPEC_A])
    sync_redis().set(redis_keys.job_claim(str(job.pk), 1), "fo-a", ex=60)
    assert jobs_failover_queued(now=timezone.now(), after_s=2.0) == []
    assert Job.objects.get(pk=job.pk).attempt == 1


def test_with_no_live_spec_a_stranded_job_waits(fleet: dict[str, ModelSpec]) -> None:
    serve("fo-other", "some-other-spec")
    job = queued_job(fleet[SPEC_A])
    assert jobs_failover_queued(now=timezone.now(), after_s=2.0) == []
    job.refresh_from_db()
    assert (job.attempt, job.spec.name) == (1, SPEC_A)


def test_a_retryable_failure_backs_the_spec_off_and_fails_over(
    fleet: dict[str, ModelSpec], django_capture_on_commit_callbacks
) -> None:
    serve("fo-a", SPEC_A)
    serve("fo-b", SPEC_B)
    job = queued_job(fleet[SPEC_A], waited_s=0.0)
    job_apply_event(job_id=str(job.pk), attempt=1, kind=JobStatus.RUNNING, worker_id="fo-a", detail={})
    before = time.time()
    with django_capture_on_commit_callbacks(execute=True):
        job_apply_event(
            job_id=str(job.pk),
            attempt=1,
            kind=JobStatus.FAILED,
            worker_id="fo-a",
            detail={"error": {"code": "engine_error", "message": "boom", "retry": True}},
        )
    job.refresh_from_db()
    assert (job.status, job.attempt, job.spec.name) == (JobStatus.QUEUED, 2, SPEC_B)
    assert queue_len(SPEC_B) == 1 and queue_len(SPEC_A) == 0
    assert spec_backoffs_sync()[SPEC_A] >= before + 2.0  # the first back-off (BackoffPolicy.base_s)


def test_a_hand_back_is_not_a_failure(fleet: dict[str, ModelSpec], django_capture_on_commit_callbacks) -> None:
    serve("fo-a", SPEC_A)
    job = queued_job(fleet[SPEC_A], waited_s=0.0)
    job_apply_event(job_id=str(job.pk), attempt=1, kind=JobStatus.RUNNING, worker_id="fo-a", detail={})
    with django_capture_on_commit_callbacks(execute=True):
        job_apply_event(
            job_id=str(job.pk), attempt=1, kind="requeue", worker_id="fo-a", detail={"reason": "worker draining"}
        )
    job.refresh_from_db()
    assert (job.attempt, job.spec.name) == (2, SPEC_A)
    assert SPEC_A not in spec_backoffs_sync()


def test_back_off_grows_with_each_failure_and_is_shared(fleet: dict[str, ModelSpec]) -> None:
    now = time.time()
    ends = [spec_failure_record(spec=SPEC_A, reason="test", now=now) - now for _ in range(4)]
    assert ends == [2.0, 4.0, 8.0, 16.0]
    assert spec_backoffs_sync()[SPEC_A] == pytest.approx(now + 16.0)


def test_failures_with_one_cause_count_once(fleet: dict[str, ModelSpec]) -> None:
    """The 20 jobs of one dead worker are one failure of their spec; another worker's death is a second one."""
    now = time.time()
    ends = [spec_failure_record(spec=SPEC_A, reason="test", cause="worker:w1", now=now) - now for _ in range(20)]
    assert ends == [2.0] * 20
    assert spec_failure_record(spec=SPEC_A, reason="test", cause="worker:w2", now=now) - now == 4.0
    assert spec_failure_record(spec=SPEC_A, reason="test", now=now) - now == 8.0  # no cause: every failure counts
    assert spec_backoffs_sync()[SPEC_A] == pytest.approx(now + 8.0)


def test_failover_dispatch_of_the_last_replica_stays_on_its_spec(fleet: dict[str, ModelSpec]) -> None:
    serve("fo-a", SPEC_A)
    job = queued_job(fleet[SPEC_A], waited_s=0.0)
    assert job_failover_dispatch(job_id=str(job.pk), failed=True, reason="test")
    assert Job.objects.get(pk=job.pk).spec.name == SPEC_A
    assert queue_len(SPEC_A) == 1


# --- routing from live state, and overload (the API's submission path) ---------------------------------------------

ENTRY = ModelEntry(
    id=0,
    name=MODEL,
    owned_by="farm",
    created=0,
    specs=(
        SpecEntry(id=1, name=SPEC_A, engine="vllm", weight=100, min_replicas=0),
        SpecEntry(id=2, name=SPEC_B, engine="vllm", weight=100, min_replicas=0),
        SpecEntry(id=3, name=SPEC_STANDBY, engine="vllm-cpu", weight=0, min_replicas=1),
    ),
)


def choose() -> str:
    registry_invalidate()
    backoffs_invalidate()
    return asyncio.run(spec_choose(ENTRY))


def test_standby_answers_only_when_no_weighted_replica_is_up(fleet: dict[str, ModelSpec]) -> None:
    serve("fo-standby", SPEC_STANDBY)
    assert choose() == SPEC_STANDBY
    serve("fo-a", SPEC_A)
    assert {choose() for _ in range(20)} == {SPEC_A}
    serve("fo-a", SPEC_A, status="draining")
    assert choose() == SPEC_STANDBY


def test_a_backed_off_spec_gets_no_new_requests_while_another_is_up(fleet: dict[str, ModelSpec]) -> None:
    serve("fo-a", SPEC_A)
    serve("fo-b", SPEC_B)
    spec_failure_record(spec=SPEC_B, reason="test")
    assert {choose() for _ in range(20)} == {SPEC_A}


def test_no_replica_is_503_with_retry_after(fleet: dict[str, ModelSpec]) -> None:
    with pytest.raises(Unavailable) as raised:
        choose()
    assert raised.value.status == 503 and raised.value.headers["Retry-After"]


def test_a_worker_that_came_up_since_the_cached_snapshot_is_routed_to(fleet: dict[str, ModelSpec]) -> None:
    """The API's registry snapshot lives up to 3 s; a request that finds no replica in it reads the registry again
    before answering 503 (a CI run once got a 503 for workers that had been serving for a second)."""

    async def scenario() -> str:
        registry_invalidate()
        backoffs_invalidate()
        with pytest.raises(Unavailable):
            await spec_choose(ENTRY)  # the snapshot now holds no replica of the model ...
        serve("fo-a", SPEC_A, invalidate=False)
        await asyncio.sleep(0.3)  # ... and is still served (it lives a second, then stale for two more)
        return await spec_choose(ENTRY)

    assert asyncio.run(scenario()) == SPEC_A


def test_saturated_replicas_and_a_long_queue_are_429_within_50ms(fleet: dict[str, ModelSpec], settings) -> None:
    from settings import env

    bound = env.FARM_OVERLOAD_QUEUE_BOUND
    serve("fo-a", SPEC_A, running=4, capacity=4)
    serve("fo-b", SPEC_B, running=4, capacity=4)
    client = sync_redis()
    client.rpush(queues.infer_queue(SPEC_A), *[b"m"] * (bound + 1))
    client.rpush(queues.infer_queue(SPEC_B), *[b"m"] * bound)
    assert choose() in (SPEC_A, SPEC_B)  # B's queue is at the bound, not over: still accepted

    client.rpush(queues.infer_queue(SPEC_B), b"m")
    timings = []
    for _ in range(20):
        started = time.perf_counter()
        with pytest.raises(ModelOverloaded) as raised:
            choose()  # uncached: registry, back-offs and queue depths are all read from Redis each time
        timings.append(time.perf_counter() - started)
    error = raised.value
    assert (error.status, error.type, error.code) == (429, "rate_limit_error", "model_overloaded")
    assert int(error.headers["Retry-After"]) >= 1
    timings.sort()
    print(f"\n429 decision: p50 {timings[10] * 1000:.2f} ms, max {timings[-1] * 1000:.2f} ms")
    assert timings[10] < 0.05

    serve("fo-b", SPEC_B, running=3, capacity=4)  # one free slot anywhere: accepted again
    assert choose() == SPEC_B


def test_an_outcome_with_nul_characters_is_stored(fleet: dict[str, ModelSpec]) -> None:
    """A model can generate U+0000, which PostgreSQL's jsonb refuses: the outcome is stored with U+FFFD instead of
    failing on every retry of its event (the job would otherwise stay running until the reaper gives up on it)."""
    job = queued_job(fleet[SPEC_A], waited_s=0.0)
    job_apply_event(job_id=str(job.pk), attempt=1, kind=JobStatus.RUNNING, worker_id="fo-a", detail={})
    assert job_apply_event(
        job_id=str(job.pk),
        attempt=1,
        kind=JobStatus.SUCCEEDED,
        worker_id="fo-a",
        detail={
            "result": {"text": "a\x00b", "finish_reason": "length"},
            "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
        },
    )
    job.refresh_from_db()
    assert (job.status, job.result["text"]) == (JobStatus.SUCCEEDED, "a\ufffdb")
