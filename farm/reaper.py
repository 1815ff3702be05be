"""Periodic repair (beat, `control` queue): nothing accepted is lost and nothing stays `running`.

- running jobs whose worker has not been seen for a lease (FARM_JOB_LEASE_S) are requeued, or failed when their
  attempts are exhausted; so are queued jobs claimed by a worker that died before it reported them running.
  "Seen" is the Worker row's `last_seen_at`, refreshed from the live registry at the start of each run, so a
  Redis restart (registry briefly empty) does not reap jobs whose workers are alive;
- queued jobs past their deadline end `timed_out`;
- queued jobs whose message the broker lost (a Redis restart without persistence) are published again: they are
  old, unclaimed, and their queue is empty. A duplicate message is harmless: the per-attempt claim lets one run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.utils import timezone

from farm import jobs, queues, redis_keys
from farm.models import Job, JobStatus, Worker
from farm.redis_client import sync_redis
from farm.workers import worker_registry_sync
from settings import env

log = logging.getLogger(__name__)



@dataclass
class ReapReport:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    timed_out: list[str] = field(default_factory=list)
    republished: list[str] = field(default_factory=list)


def _requeue(job: Job, reason: str, report: ReapReport) -> None:
    requeued = jobs.job_requeue(job_id=str(job.pk), attempt=job.attempt, reason=reason, worker_id="reaper")
    if requeued is None:
        return
    if requeued.failed:
        report.failed.append(str(job.pk))
        return
    jobs.job_dispatch(job_id=str(job.pk))
    report.requeued.append(str(job.pk))


def _silent(worker_id: str, since: datetime, seen: dict[str, datetime | None], cutoff: datetime) -> bool:
    """A worker is silent when last seen before the cutoff, or never seen and the job is older than the lease."""
    last = seen.get(worker_id)
    return (last or since) < cutoff


def jobs_reap(*, sweep_after_s: float | None = None, lease_s: float | None = None) -> ReapReport:
    report = ReapReport()
    client = sync_redis()
    live = {worker.worker_id: worker for worker in worker_registry_sync()}
    now = timezone.now()
    cutoff = now - timedelta(seconds=env.FARM_JOB_LEASE_S if lease_s is None else lease_s)
    sweep_after = env.FARM_SWEEP_AFTER_S if sweep_after_s is None else sweep_after_s
    seen = dict(Worker.objects.values_list("worker_id", "last_seen_at"))

    for job in Job.objects.filter(status=JobStatus.RUNNING).only("pk", "attempt", "worker_id", "started_at"):
        worker = live.get(job.worker_id)
        if worker is None and _silent(job.worker_id, job.started_at or now, seen, cutoff):
            _requeue(job, f"worker {job.worker_id or '?'} went silent", report)
        elif worker is not None and str(job.pk) not in worker.running_jobs and (job.started_at or now) < cutoff:
            # Alive but not running it: its outcome event was lost (e.g. a broker restart). Run it again.
            _requeue(job, f"worker {job.worker_id} no longer runs it", report)

    for job in Job.objects.filter(status=JobStatus.QUEUED, deadline_at__lt=now).only("pk", "attempt"):
        if jobs.job_transition(job_id=str(job.pk), attempt=job.attempt, to=JobStatus.TIMED_OUT, worker_id="reaper",
                               detail={"error": {"code": "deadline_exceeded", "message": "expired while queued"}}):
            report.timed_out.append(str(job.pk))

    stale = Job.objects.select_related("spec").filter(
        status=JobStatus.QUEUED, dispatched_at__lt=now - timedelta(seconds=sweep_after))
    for job in stale.only("pk", "attempt", "dispatched_at", "spec__name"):
        claimant = client.get(redis_keys.job_claim(str(job.pk), job.attempt))
        if claimant is not None:
            if _silent(claimant.decode(), job.dispatched_at or now, seen, cutoff):
                _requeue(job, f"worker {claimant.decode()} died before starting it", report)
            continue
        if job.spec is not None and client.llen(queues.infer_queue(job.spec.name)) == 0:
            log.warning("job %s: message presumed lost by the broker; publishing attempt %d again", job.pk,
                        job.attempt)
            jobs.job_dispatch(job_id=str(job.pk))
            report.republished.append(str(job.pk))

    if any((report.requeued, report.failed, report.timed_out, report.republished)):
        log.info("reaper: %s", report)
    return report
