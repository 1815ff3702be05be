"""Failover between the specs of a model (control plane): a retried job goes to the model's next live spec, and
queued jobs stranded on a spec that lost its last replica move to a live one. Bounded by the job's attempts.

- A worker-side retryable failure, or a worker that died with the job (reaper), backs the spec off
  (`farm.spec_health`) and requeues the job as attempt + 1 (`farm.jobs.job_requeue`); `job_failover_dispatch` then
  routes that attempt like a new request, avoiding the spec it failed on while another spec has a live replica.
- `jobs_failover_queued` (each reaper run) moves queued jobs whose spec has had no live replica for
  FARM_FAILOVER_AFTER_S. Their message stays in the dead spec's queue: its claim is taken first, so a worker that
  comes back later finds it claimed and drops it (the per-attempt claim of `gpu_workers.runtime`).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from django.db import transaction

from farm import jobs, redis_keys
from farm.models import Job, JobEvent, JobStatus, ModelSpec
from farm.redis_client import sync_redis
from farm.registry import LiveWorker, live_workers_sync
from farm.routing import route_request, spec_states
from farm.spec_health import spec_backoffs_sync, spec_failure_record

log = logging.getLogger(__name__)

# As long as a worker's claim (gpu_workers.runtime.CLAIM_TTL_S): the stale message must find it taken.
_CLAIM_TTL_S = 2 * 3600


def _model_specs(job: Job) -> list[ModelSpec]:
    """The enabled specs that serve the job's model (a fine-tuned model is served by its base's specs)."""
    model = job.model
    if model is None:
        return []
    serving_id = getattr(model, "base_id", None) or model.pk  # `base` comes with fine-tuning (farm.fine_tuning)
    return list(ModelSpec.objects.filter(model_id=serving_id, enabled=True).order_by("pk"))


def job_spec_next(*, job: Job, exclude: set[str], live: list[LiveWorker] | None = None) -> ModelSpec | None:
    """The spec a retry of `job` should run on, routed from the live registry and the back-offs like a new request
    (`exclude` is avoided while another spec has a replica). None when no spec of its model has a live replica."""
    specs = _model_specs(job)
    if not specs:
        return None
    if live is None:
        live = live_workers_sync()[0]
    now = time.time()
    states = spec_states([(spec.name, spec.weight) for spec in specs], live, now=now, backoffs=spec_backoffs_sync())
    choice = route_request(states, now=now, exclude=exclude)
    return next((spec for spec in specs if choice is not None and spec.name == choice.name), None)


def job_move_spec(*, job_id: str, attempt: int, spec: ModelSpec, reason: str) -> bool:
    """Moves a queued attempt to another spec of its model (guarded on status and attempt); records why."""
    with transaction.atomic():
        moved = Job.objects.filter(pk=job_id, status=JobStatus.QUEUED, attempt=attempt).update(spec=spec)
        if moved:
            JobEvent.objects.create(
                job_id=job_id,
                kind="failover",
                attempt=attempt,
                worker_id="router",
                detail={"spec": spec.name, "reason": reason},
            )
    return bool(moved)


def job_failover_dispatch(
    *, job_id: str, failed: bool, countdown: float = 0.0, reason: str = "", cause: str | None = None
) -> bool:
    """Publishes a requeued job's new attempt. When the attempt `failed` (not a hand-back), its spec is backed off
    (once per `cause`, see `spec_failure_record`) and the job goes to another live spec of the model when there is
    one (at once: that spec is healthy); else it is routed like a new request (after `countdown` when it stays on
    the same spec). Returns whether it was sent."""
    job = Job.objects.select_related("spec", "model").filter(pk=job_id, status=JobStatus.QUEUED).first()
    if job is None or job.spec is None or job.kind not in jobs.INFERENCE_KINDS:
        return jobs.job_dispatch(job_id=job_id, countdown=countdown)
    current = job.spec.name
    if failed:
        spec_failure_record(
            spec=current, reason=reason or f"job {job_id} attempt {job.attempt - 1} failed", cause=cause
        )
    target = job_spec_next(job=job, exclude={current} if failed else set())
    if (
        target is not None
        and target.name != current
        and job_move_spec(job_id=job_id, attempt=job.attempt, spec=target, reason=f"{current}: {reason}")
    ):
        log.warning("job %s attempt %d fails over from %s to %s", job_id, job.attempt, current, target.name)
        countdown = 0.0
    return jobs.job_dispatch(job_id=job_id, countdown=countdown)


def jobs_failover_queued(*, now: datetime, after_s: float) -> list[str]:
    """Moves queued inference jobs waiting over `after_s` on a spec with no live replica to a live spec of their
    model, as a new attempt. Returns the ids moved. A job whose attempts are exhausted fails instead
    (`job_requeue`); one that no live spec can take stays where it is (its deadline still bounds it)."""
    live = live_workers_sync()[0]
    epoch = now.timestamp()
    served = {
        name
        for worker in live
        if worker.accepts_work and worker.fresh(epoch)
        for name in (*worker.specs, *worker.lazy_specs)
    }
    stranded = (
        Job.objects.select_related("spec", "model")
        .filter(
            status=JobStatus.QUEUED,
            kind__in=jobs.INFERENCE_KINDS,
            spec__isnull=False,
            dispatched_at__lt=now - timedelta(seconds=after_s),
        )
        .exclude(spec__name__in=served)
    )
    client = sync_redis()
    moved: list[str] = []
    for job in stranded:
        target = job_spec_next(job=job, exclude={job.spec.name}, live=live)
        if target is None or target.pk == job.spec_id:
            continue
        job_id = str(job.pk)
        # Take the stranded message's claim: if a worker already took it, the reaper's claimant check owns the job.
        if not client.set(redis_keys.job_claim(job_id, job.attempt), "failover", nx=True, ex=_CLAIM_TTL_S):
            continue
        reason = f"spec {job.spec.name} has no live replica"
        requeued = jobs.job_requeue(job_id=job_id, attempt=job.attempt, reason=reason, worker_id="router")
        if requeued is None or requeued.failed:
            continue
        job_move_spec(job_id=job_id, attempt=requeued.attempt, spec=target, reason=reason)
        jobs.job_dispatch(job_id=job_id)
        moved.append(job_id)
    if moved:
        log.warning("failover: %d queued job(s) moved off specs without replicas: %s", len(moved), moved)
    return moved
