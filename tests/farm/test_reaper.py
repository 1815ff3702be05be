"""The reaper (`farm.reaper.jobs_reap`) on the real database and Redis: silent workers lose their jobs, a live
worker's job whose outcome event is still on its way is left alone for a lease (longer when its answer is already in
its stream), expired queued jobs time out."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta

import orjson
import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from farm import queues, redis_keys, stream_format
from farm.catalog import model_upsert, spec_upsert
from farm.job_streams import job_stream_answered_at
from farm.jobs import job_apply_event, job_create
from farm.models import Job, JobKind, JobStatus
from farm.reaper import ANSWERED_GRACE_LEASES, jobs_reap
from farm.redis_client import sync_redis
from farm.stream_format import Delta, End, Restart

pytestmark = pytest.mark.django_db

SPEC = "reaper-test-spec"
LEASE_S = 5.0


@pytest.fixture
def running_job() -> Iterator[Job]:
    """A job that worker `w-live` reported running a lease ago."""
    client = sync_redis()
    client.delete(redis_keys.REAPER_SUSPECTS, redis_keys.REAPER_LOCK, queues.infer_queue(SPEC))
    owner = get_user_model().objects.create(username="reaper-owner")
    model = model_upsert(name="reaper-test-model")
    spec = spec_upsert(model=model, name=SPEC, engine="vllm-cpu")
    job = running_since_a_lease(owner_id=owner.pk, model_id=model.pk, spec_id=spec.pk)
    yield job
    client.delete(redis_keys.REAPER_SUSPECTS, queues.infer_queue(SPEC), redis_keys.worker("w-live"))
    client.srem(redis_keys.WORKERS_SET, "w-live")


def running_since_a_lease(*, owner_id: int, model_id: int, spec_id: int) -> Job:
    """A job that worker `w-live` reported running two leases ago."""
    job = job_create(
        owner_id=owner_id,
        api_key_id=None,
        kind=JobKind.CHAT,
        model_id=model_id,
        spec_id=spec_id,
        request={"messages": [{"role": "user", "content": "hi"}]},
        deadline_at=timezone.now() + timedelta(minutes=5),
    )
    assert job_apply_event(job_id=str(job.pk), attempt=1, kind=JobStatus.RUNNING, worker_id="w-live", detail={})
    Job.objects.filter(pk=job.pk).update(started_at=timezone.now() - timedelta(seconds=2 * LEASE_S))
    return job


def advertise(worker_id: str, running_jobs: list[str]) -> None:
    client = sync_redis()
    entry = {
        "worker_id": worker_id,
        "ts": time.time(),
        "specs": [SPEC],
        "status": "ready",
        "running_jobs": running_jobs,
        "load": {"running": len(running_jobs), "capacity": 4},
    }
    client.set(redis_keys.worker(worker_id), orjson.dumps(entry), ex=30)
    client.sadd(redis_keys.WORKERS_SET, worker_id)


def test_a_live_worker_that_still_runs_the_job_keeps_it(running_job: Job) -> None:
    advertise("w-live", [str(running_job.pk)])
    report = jobs_reap(lease_s=LEASE_S)
    assert str(running_job.pk) not in report.requeued + report.failed
    running_job.refresh_from_db()
    assert (running_job.status, running_job.attempt) == (JobStatus.RUNNING, 1)


def test_an_outcome_on_its_way_is_not_mistaken_for_a_lost_one(running_job: Job) -> None:
    """The worker finished (it no longer lists the job) but the control worker has not applied the outcome yet: the
    first sighting only marks the job; it is requeued a lease later if the outcome never came."""
    advertise("w-live", [])
    assert jobs_reap(lease_s=LEASE_S).requeued == []
    running_job.refresh_from_db()
    assert running_job.status == JobStatus.RUNNING
    marked = sync_redis().hget(redis_keys.REAPER_SUSPECTS, f"{running_job.pk}:1")
    assert marked is not None and abs(float(marked) - time.time()) < 5

    # The outcome arrives in time: the job ends once, and the mark is dropped at the next run.
    assert job_apply_event(
        job_id=str(running_job.pk),
        attempt=1,
        kind=JobStatus.SUCCEEDED,
        worker_id="w-live",
        detail={"usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}},
    )
    assert jobs_reap(lease_s=LEASE_S).requeued == []
    assert sync_redis().hlen(redis_keys.REAPER_SUSPECTS) == 0


def test_an_outcome_lost_for_a_whole_lease_requeues_the_job(running_job: Job) -> None:
    """A live worker lost track of the job (its event was lost): run again, and its spec is not backed off."""
    from farm.spec_health import spec_backoff_clear, spec_backoffs_sync

    spec_backoff_clear(spec=SPEC)
    advertise("w-live", [])
    jobs_reap(lease_s=LEASE_S)
    sync_redis().hset(redis_keys.REAPER_SUSPECTS, f"{running_job.pk}:1", time.time() - LEASE_S - 1)
    report = jobs_reap(lease_s=LEASE_S)
    assert report.requeued == [str(running_job.pk)]
    running_job.refresh_from_db()
    assert (running_job.status, running_job.attempt) == (JobStatus.QUEUED, 2)
    assert sync_redis().llen(queues.infer_queue(SPEC)) == 1  # attempt 2 published
    assert SPEC not in spec_backoffs_sync()


def test_a_silent_worker_loses_its_job(running_job: Job) -> None:
    """No registry entry and not seen for a lease: requeued at once, no grace needed."""
    report = jobs_reap(lease_s=LEASE_S)
    assert report.requeued == [str(running_job.pk)]
    running_job.refresh_from_db()
    assert (running_job.status, running_job.attempt) == (JobStatus.QUEUED, 2)


def test_a_run_while_another_is_in_progress_is_skipped(running_job: Job) -> None:
    """Beat sends a run every period whether or not the last one ended: runs never overlap."""
    other_run = sync_redis().lock(redis_keys.REAPER_LOCK, timeout=30, blocking=False)
    assert other_run.acquire()
    try:
        report = jobs_reap(lease_s=LEASE_S)
        assert report.skipped and report.requeued == []
        running_job.refresh_from_db()
        assert (running_job.status, running_job.attempt) == (JobStatus.RUNNING, 1)
    finally:
        other_run.release()
    report = jobs_reap(lease_s=LEASE_S)  # the lock is free: the silent worker's job is requeued
    assert not report.skipped and report.requeued == [str(running_job.pk)]
    assert not jobs_reap(lease_s=LEASE_S).skipped  # a run releases the lock when it ends


def test_a_silent_worker_backs_its_spec_off_once_however_many_jobs_it_held(running_job: Job) -> None:
    """A worker that dies (or is only late to beat, on a starved host) with many jobs costs its spec the first
    back-off step, not the policy's maximum: each of its jobs must not count as another failure."""
    from farm.spec_health import spec_backoff_clear, spec_backoffs_sync

    spec_backoff_clear(spec=SPEC)
    others = [
        running_since_a_lease(owner_id=running_job.owner_id, model_id=running_job.model_id, spec_id=running_job.spec_id)
        for _ in range(5)
    ]
    started = time.time()
    try:
        report = jobs_reap(lease_s=LEASE_S)
        assert sorted(report.requeued) == sorted(str(job.pk) for job in [running_job, *others])
        assert spec_backoffs_sync()[SPEC] - started == pytest.approx(2.0, abs=1.0)  # one failure: the base delay
    finally:
        spec_backoff_clear(spec=SPEC)


def test_a_queued_job_past_its_deadline_times_out(running_job: Job) -> None:
    advertise("w-live", [str(running_job.pk)])
    Job.objects.filter(pk=running_job.pk).update(status=JobStatus.QUEUED, deadline_at=timezone.now())
    report = jobs_reap(lease_s=LEASE_S)
    assert report.timed_out == [str(running_job.pk)]
    running_job.refresh_from_db()
    assert running_job.status == JobStatus.TIMED_OUT


def claimed_but_queued(job: Job, worker_id: str) -> str:
    """`job` back to queued (dispatched two leases ago) with its attempt claimed by `worker_id`: what a claim whose
    reply was lost leaves behind (the worker's redelivered copy then finds the attempt taken and ignores it)."""
    dispatched_at = timezone.now() - timedelta(seconds=2 * LEASE_S)
    Job.objects.filter(pk=job.pk).update(
        status=JobStatus.QUEUED, worker_id="", started_at=None, dispatched_at=dispatched_at
    )
    claim = redis_keys.job_claim(str(job.pk), 1)
    sync_redis().set(claim, worker_id, ex=60)
    sync_redis().delete(redis_keys.REAPER_CLAIM_SUSPECTS)
    return claim


def test_a_claim_a_live_worker_does_not_run_is_released_a_lease_after_it_was_seen(running_job: Job) -> None:
    """The claim's reply was lost: the job runs again, and its spec is not backed off (nothing failed)."""
    from farm.spec_health import spec_backoff_clear, spec_backoffs_sync

    spec_backoff_clear(spec=SPEC)
    claim = claimed_but_queued(running_job, "w-live")
    try:
        advertise("w-live", [])
        assert jobs_reap(sweep_after_s=0, lease_s=LEASE_S).requeued == []  # first sighting: only marked
        running_job.refresh_from_db()
        assert (running_job.status, running_job.attempt) == (JobStatus.QUEUED, 1)
        marked = sync_redis().hget(redis_keys.REAPER_CLAIM_SUSPECTS, f"{running_job.pk}:1")
        assert marked is not None and abs(float(marked) - time.time()) < 5
        assert sync_redis().llen(queues.infer_queue(SPEC)) == 0  # claimed: not mistaken for a lost message

        sync_redis().hset(redis_keys.REAPER_CLAIM_SUSPECTS, f"{running_job.pk}:1", time.time() - LEASE_S - 1)
        report = jobs_reap(sweep_after_s=0, lease_s=LEASE_S)
        assert report.requeued == [str(running_job.pk)]
        running_job.refresh_from_db()
        assert (running_job.status, running_job.attempt) == (JobStatus.QUEUED, 2)
        assert sync_redis().llen(queues.infer_queue(SPEC)) == 1  # attempt 2 published
        assert sync_redis().hlen(redis_keys.REAPER_CLAIM_SUSPECTS) == 0
        assert SPEC not in spec_backoffs_sync()
    finally:
        sync_redis().delete(claim, redis_keys.REAPER_CLAIM_SUSPECTS)


def test_a_claimed_job_its_live_worker_runs_is_left_alone(running_job: Job) -> None:
    """Claimed and running on the worker, its `running` event not applied yet (a busy control queue)."""
    claim = claimed_but_queued(running_job, "w-live")
    try:
        advertise("w-live", [str(running_job.pk)])
        for _ in range(2):
            assert jobs_reap(sweep_after_s=0, lease_s=LEASE_S).requeued == []
        assert sync_redis().hlen(redis_keys.REAPER_CLAIM_SUSPECTS) == 0
        running_job.refresh_from_db()
        assert (running_job.status, running_job.attempt) == (JobStatus.QUEUED, 1)
    finally:
        sync_redis().delete(claim, redis_keys.REAPER_CLAIM_SUSPECTS)


def answered(job: Job, *, seconds_ago: float, attempt: int = 1) -> None:
    """The job's stream as a worker leaves it when `attempt` answered `seconds_ago`: a delta, then its `End`."""
    key = redis_keys.job_stream(str(job.pk))
    client = sync_redis()
    client.delete(key)
    ms = int((time.time() - seconds_ago) * 1000)
    if attempt > 1:
        client.xadd(key, {stream_format.FIELD: stream_format.encode(Restart(attempt))}, id=f"{ms - 2}-0")
    client.xadd(key, {stream_format.FIELD: stream_format.encode(Delta("hi", 1))}, id=f"{ms - 1}-0")
    client.xadd(key, {stream_format.FIELD: stream_format.encode(End("stop", 1, 1))}, id=f"{ms}-0")


def test_an_answered_job_whose_events_are_behind_is_not_run_twice(running_job: Job) -> None:
    """The worker answered (its `End` is in the stream) but the control queue is behind by more than a lease: the
    job waits `ANSWERED_GRACE_LEASES` leases from its answer, then is presumed lost and run again."""
    advertise("w-live", [])
    key = f"{running_job.pk}:1"
    try:
        answered(running_job, seconds_ago=LEASE_S)
        sync_redis().hset(redis_keys.REAPER_SUSPECTS, key, time.time() - 2 * LEASE_S)
        assert jobs_reap(lease_s=LEASE_S).requeued == []
        running_job.refresh_from_db()
        assert (running_job.status, running_job.attempt) == (JobStatus.RUNNING, 1)
        assert sync_redis().hexists(redis_keys.REAPER_SUSPECTS, key)  # still watched

        answered(running_job, seconds_ago=ANSWERED_GRACE_LEASES * LEASE_S + 1)
        assert jobs_reap(lease_s=LEASE_S).requeued == [str(running_job.pk)]
        running_job.refresh_from_db()
        assert (running_job.status, running_job.attempt) == (JobStatus.QUEUED, 2)
    finally:
        sync_redis().delete(redis_keys.job_stream(str(running_job.pk)))


def test_an_answered_claim_whose_events_are_behind_is_not_run_twice(running_job: Job) -> None:
    """Claimed, run and answered while its `running` event is still queued: the claim is not released."""
    claim = claimed_but_queued(running_job, "w-live")
    try:
        advertise("w-live", [])
        answered(running_job, seconds_ago=0)
        sync_redis().hset(redis_keys.REAPER_CLAIM_SUSPECTS, f"{running_job.pk}:1", time.time() - LEASE_S - 1)
        report = jobs_reap(sweep_after_s=0, lease_s=LEASE_S)
        assert report.requeued == [] and report.republished == []
        running_job.refresh_from_db()
        assert (running_job.status, running_job.attempt) == (JobStatus.QUEUED, 1)
    finally:
        sync_redis().delete(claim, redis_keys.REAPER_CLAIM_SUSPECTS, redis_keys.job_stream(str(running_job.pk)))


def test_an_earlier_attempts_answer_does_not_vouch_for_a_later_one(running_job: Job) -> None:
    """Attempt 2 runs (a retry); the stream's `End` is attempt 1's: it says nothing of attempt 2."""
    job_id = str(running_job.pk)
    try:
        answered(running_job, seconds_ago=0, attempt=1)
        assert job_stream_answered_at(job_id, 1) == pytest.approx(time.time(), abs=2)
        assert job_stream_answered_at(job_id, 2) is None
        answered(running_job, seconds_ago=0, attempt=2)
        assert job_stream_answered_at(job_id, 1) is None
        assert job_stream_answered_at(job_id, 2) == pytest.approx(time.time(), abs=2)
        sync_redis().xadd(redis_keys.job_stream(job_id), {stream_format.FIELD: stream_format.encode(Restart(3))})
        assert job_stream_answered_at(job_id, 3) is None  # started over, not answered yet
    finally:
        sync_redis().delete(redis_keys.job_stream(job_id))
