"""Periodic repair (beat, `control` queue): nothing accepted is lost and nothing stays `running`.

- running jobs whose worker has not been seen for a lease (FARM_JOB_LEASE_S) are requeued, or failed when their
  attempts are exhausted; so are queued jobs claimed by a worker that died before it reported them running, and,
  a lease after it was first seen, a queued job claimed by a live worker that does not run it (the claim's reply was
  lost: the worker's redelivered copy then found the attempt taken, by itself); a job whose answer is already in its
  stream waits `ANSWERED_GRACE_LEASES` leases from that answer instead (its events are behind, not lost);
  "Seen" is the Worker row's `last_seen_at`, refreshed from the live registry at the start of each run, so a
  Redis restart (registry briefly empty) does not reap jobs whose workers are alive;
- queued jobs past their deadline end `timed_out`;
- queued jobs stranded on a spec with no live replica move to a live spec of their model (`farm.failover`);
- queued jobs whose message the broker lost (a Redis restart without persistence) are published again: they are
  old, unclaimed, and their queue is empty. A duplicate message is harmless: the per-attempt claim lets one run.

One run at a time (a Redis lock): beat sends a run every FARM_REAP_EVERY_S whether or not the last one ended, and
overlapping runs repeated each other's work, raced on the suspects hashes and held the control worker's threads
(in CI, with a 1 s period on a loaded host, three ran at once for up to 12.6 s each). A run that finds the lock
held is skipped.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.utils import timezone
from redis import Redis
from redis.exceptions import LockError

from farm import jobs, queues, redis_keys
from farm.failover import job_failover_dispatch, jobs_failover_queued
from farm.job_streams import job_stream_answered_at
from farm.models import Job, JobStatus, Worker
from farm.redis_client import sync_redis
from farm.registry import LiveWorker
from farm.workers import worker_registry_sync
from settings import env

log = logging.getLogger(__name__)

# A job whose attempt already wrote its answer (`End`) to its stream has finished; only its outcome event has not
# reached the database (a control queue running behind). Running it again would answer twice and count its tokens
# twice, so it is given up on only if that event is still missing this many leases after the answer.
ANSWERED_GRACE_LEASES = 3
# The lock outlives a run that dies without releasing it by at most this long (the task's hard time limit).
LOCK_TTL_S = queues.REAP_TASK.time_limit_s


@dataclass
class ReapReport:
    skipped: bool = False  # another run held the lock; nothing was looked at
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    timed_out: list[str] = field(default_factory=list)
    republished: list[str] = field(default_factory=list)
    failed_over: list[str] = field(default_factory=list)


def _requeue(job: Job, reason: str, report: ReapReport, *, worker_id: str, worker_died: bool) -> None:
    """Requeues a job its worker (`worker_id`) lost. A dead worker counts once against the spec (it may be the spec
    that kills it); a live one that lost track of the job (a lost reply or event) does not: the spec is not backed
    off and the job stays on it."""
    requeued = jobs.job_requeue(job_id=str(job.pk), attempt=job.attempt, reason=reason, worker_id="reaper")
    if requeued is None:
        return
    if requeued.failed:
        report.failed.append(str(job.pk))
        return
    job_failover_dispatch(job_id=str(job.pk), failed=worker_died, reason=reason, cause=f"worker:{worker_id}")
    report.requeued.append(str(job.pk))


def _silent(worker_id: str, since: datetime, seen: dict[str, datetime | None], cutoff: datetime) -> bool:
    """A worker is silent when last seen before the cutoff, or never seen and the job is older than the lease."""
    last = seen.get(worker_id)
    return (last or since) < cutoff


@dataclass(frozen=True)
class _Now:
    """One reaper run's view of time and the fleet."""

    at: datetime
    cutoff: datetime  # workers not seen since are silent
    seen: dict[str, datetime | None]  # worker id -> last seen

    @property
    def lease_s(self) -> float:
        return (self.at - self.cutoff).total_seconds()


class _Suspects:
    """Jobs a live worker was seen not running although their state says it should (`<job id>:<attempt>` -> epoch
    seconds of the first sighting), kept across reaper runs in a Redis hash: a job is given up on only once it has
    been a suspect for a whole lease (its event may still be on its way through a busy control queue), or longer
    when its answer is already in its stream (`given_up`)."""

    def __init__(self, client: Redis, key: str, now: _Now) -> None:
        self._client, self._key, self._now = client, key, now
        self._seen = {k.decode(): float(v) for k, v in client.hgetall(key).items()}
        self._still: dict[str, float] = {}

    def given_up(self, job: Job) -> bool:
        """Records a sighting of `job`; True once its event is presumed lost (it is then dropped): a whole lease
        after the first sighting, or, when the attempt's answer is already in its stream, `ANSWERED_GRACE_LEASES`
        leases after that answer was written."""
        key, at = f"{job.pk}:{job.attempt}", self._now.at.timestamp()
        first_seen = self._seen.get(key, at)
        if at - first_seen < self._now.lease_s:
            self._still[key] = first_seen
            return False
        answered_at = job_stream_answered_at(str(job.pk), job.attempt)
        if answered_at is not None and at - answered_at < ANSWERED_GRACE_LEASES * self._now.lease_s:
            log.info(
                "job %s attempt %d answered %.0f s ago; its outcome event is on its way",
                job.pk,
                job.attempt,
                at - answered_at,
            )
            self._still[key] = first_seen
            return False
        return True

    def save(self) -> None:
        """Keeps this run's suspects; the others (ended, running again, requeued) are forgotten."""
        with self._client.pipeline(transaction=True) as pipe:
            pipe.delete(self._key)
            if self._still:
                pipe.hset(self._key, mapping=self._still)
            pipe.execute()


def _reap_running(client: Redis, live: dict[str, LiveWorker], now: _Now, report: ReapReport) -> None:
    """Requeues running jobs whose worker went silent, or that a live worker has not run for a whole lease."""
    suspects = _Suspects(client, redis_keys.REAPER_SUSPECTS, now)
    for job in Job.objects.filter(status=JobStatus.RUNNING).only("pk", "attempt", "worker_id", "started_at"):
        worker = live.get(job.worker_id)
        started = job.started_at or now.at
        if worker is None and _silent(job.worker_id, started, now.seen, now.cutoff):
            worker_id = job.worker_id or "?"
            _requeue(job, f"worker {worker_id} went silent", report, worker_id=worker_id, worker_died=True)
        # Alive but not running it: its outcome event is on its way (a busy control queue) or was lost (a broker
        # restart). Only after a whole lease of not running it is the event presumed lost and the job run again.
        elif (
            worker is not None
            and str(job.pk) not in worker.running_jobs
            and started < now.cutoff
            and suspects.given_up(job)
        ):
            reason = f"worker {job.worker_id} no longer runs it"
            _requeue(job, reason, report, worker_id=job.worker_id, worker_died=False)
    suspects.save()


def _sweep_queued(
    client: Redis, live: dict[str, LiveWorker], now: _Now, sweep_after_s: float, report: ReapReport
) -> None:
    """Times out expired queued jobs; requeues those claimed by a dead worker, or a lease after it was first seen by
    a live one that does not run them; re-publishes those the broker lost."""
    for job in Job.objects.filter(status=JobStatus.QUEUED, deadline_at__lt=now.at).only("pk", "attempt"):
        if jobs.job_transition(
            job_id=str(job.pk),
            attempt=job.attempt,
            to=JobStatus.TIMED_OUT,
            worker_id="reaper",
            detail={"error": {"code": "deadline_exceeded", "message": "expired while queued"}},
        ):
            report.timed_out.append(str(job.pk))

    stale = Job.objects.select_related("spec").filter(
        status=JobStatus.QUEUED, dispatched_at__lt=now.at - timedelta(seconds=sweep_after_s)
    )
    suspects = _Suspects(client, redis_keys.REAPER_CLAIM_SUSPECTS, now)
    for job in stale.only("pk", "attempt", "dispatched_at", "kind", "request", "spec__name"):
        claimant = client.get(redis_keys.job_claim(str(job.pk), job.attempt))
        if claimant is not None:
            worker_id = claimant.decode()
            worker = live.get(worker_id)
            if worker is None and _silent(worker_id, job.dispatched_at or now.at, now.seen, now.cutoff):
                reason = f"worker {worker_id} died before starting it"
                _requeue(job, reason, report, worker_id=worker_id, worker_died=True)
            # Its running (or outcome) event may be on its way: only a whole lease later is the claim orphaned.
            elif worker is not None and str(job.pk) not in worker.running_jobs and suspects.given_up(job):
                reason = f"worker {worker_id} claimed it and does not run it"
                _requeue(job, reason, report, worker_id=worker_id, worker_died=False)
            continue
        queue = jobs.job_queue(job)
        if queue is not None and client.llen(queue) == 0:
            log.warning("job %s: message presumed lost by the broker; publishing attempt %d again", job.pk, job.attempt)
            jobs.job_dispatch(job_id=str(job.pk))
            report.republished.append(str(job.pk))

    suspects.save()

    # Jobs waiting on others are released when those finish (`jobs_release_dependents`, after commit); this
    # catches a release lost with a crashed process. `job_dispatch` leaves the ones still waiting alone.
    for job_id in Job.objects.filter(status=JobStatus.QUEUED, dispatched_at__isnull=True).values_list("pk", flat=True):
        if jobs.job_dispatch(job_id=str(job_id)):
            report.republished.append(str(job_id))


def jobs_reap(*, sweep_after_s: float | None = None, lease_s: float | None = None) -> ReapReport:
    """One reaper run (beat, every FARM_REAP_EVERY_S), skipped while another holds the lock: see the module
    docstring."""
    client = sync_redis()
    lock = client.lock(redis_keys.REAPER_LOCK, timeout=LOCK_TTL_S, blocking=False)
    if not lock.acquire():
        log.debug("reaper: another run is in progress; skipped")
        return ReapReport(skipped=True)
    try:
        return _reap(client, sweep_after_s=sweep_after_s, lease_s=lease_s)
    finally:
        with contextlib.suppress(LockError):  # held past its TTL: another run may have it now
            lock.release()


def _reap(client: Redis, *, sweep_after_s: float | None, lease_s: float | None) -> ReapReport:
    report = ReapReport()
    # The clock starts before the registry is read: a sync slowed down by the database (row locks under a busy
    # control queue) must not make a heartbeat read fresh look older than a lease.
    at = timezone.now()
    live = {worker.worker_id: worker for worker in worker_registry_sync()}
    now = _Now(
        at=at,
        cutoff=at - timedelta(seconds=env.FARM_JOB_LEASE_S if lease_s is None else lease_s),
        seen=dict(Worker.objects.values_list("worker_id", "last_seen_at")),
    )
    _reap_running(client, live, now, report)
    _sweep_queued(client, live, now, env.FARM_SWEEP_AFTER_S if sweep_after_s is None else sweep_after_s, report)
    report.failed_over = jobs_failover_queued(now=at, after_s=env.FARM_FAILOVER_AFTER_S)
    if any((report.requeued, report.failed, report.timed_out, report.republished, report.failed_over)):
        log.info("reaper: %s", report)
    return report
