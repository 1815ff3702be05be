"""The job state machine. Every transition is one guarded conditional UPDATE (status, attempt), so a duplicate or
late event cannot move a job twice, and a terminal state is never left (a database trigger enforces that too).

    queued -> running -> succeeded | failed | canceled | timed_out
    running -> queued   (retry or hand-back: attempt + 1)
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from farm.errors import Conflict, NotFound
from farm.models import TERMINAL_STATUSES, Job, JobEvent, JobStatus

log = logging.getLogger(__name__)

ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)

# Which statuses an event may move a job from.
_ALLOWED_FROM: dict[str, tuple[str, ...]] = {
    JobStatus.RUNNING: (JobStatus.QUEUED,),
    JobStatus.SUCCEEDED: ACTIVE,
    JobStatus.FAILED: ACTIVE,
    JobStatus.TIMED_OUT: ACTIVE,
    JobStatus.CANCELED: ACTIVE,
}


@dataclass(frozen=True)
class RetryPolicy:
    """Retries for transient failures only (engine crash, lost worker, broker hiccup)."""

    max_attempts: int = 3
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0

    def delay_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """Exponential backoff with full jitter before `attempt` (2, 3, ...)."""
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** max(0, attempt - 2))
        return (rng or random).uniform(ceiling / 2, ceiling)


RETRY_POLICY = RetryPolicy()


def job_create(
    *, owner_id: int, api_key_id: int | None, kind: str, model_id: int, spec_id: int, request: dict[str, Any],
    deadline_at: datetime,
) -> Job:
    return Job.objects.create(
        owner_id=owner_id, api_key_id=api_key_id, kind=kind, model_id=model_id, spec_id=spec_id, request=request,
        deadline_at=deadline_at, max_attempts=RETRY_POLICY.max_attempts, dispatched_at=timezone.now(),
    )


def _record(job_id: str, kind: str, attempt: int, worker_id: str, detail: dict[str, Any]) -> None:
    JobEvent.objects.create(job_id=job_id, kind=kind, attempt=attempt, worker_id=worker_id, detail=detail)


def job_transition(*, job_id: str, attempt: int | None, to: str, worker_id: str = "",
                   detail: dict[str, Any] | None = None) -> bool:
    """Moves the job to `to` if it is in a state that may go there (and on `attempt`, when given)."""
    detail = detail or {}
    allowed = _ALLOWED_FROM.get(to)
    if allowed is None:
        raise ValueError(f"unknown job status {to!r}")
    now = timezone.now()
    changes: dict[str, Any] = {"status": to}
    if to == JobStatus.RUNNING:
        changes.update(worker_id=worker_id, started_at=now)
    else:
        changes["finished_at"] = now
        for field in ("usage", "result", "error"):
            if field in detail:
                changes[field] = detail[field]
    rows = Job.objects.filter(pk=job_id, status__in=allowed)
    if attempt is not None:
        rows = rows.filter(attempt=attempt)
    with transaction.atomic():
        moved = rows.update(**changes)
        if moved:
            _record(job_id, to, attempt or 0, worker_id, {k: v for k, v in detail.items() if k != "result"})
    if not moved:
        log.info("job %s: %s (attempt %s, %s) ignored: the job already moved on", job_id, to, attempt, worker_id)
    return bool(moved)


@dataclass(frozen=True)
class Requeued:
    """What `job_requeue` did: `attempt` is the new attempt to publish, or None if the job failed instead."""

    attempt: int | None

    @property
    def failed(self) -> bool:
        return self.attempt is None


def job_requeue(*, job_id: str, attempt: int, reason: str, worker_id: str = "") -> Requeued | None:
    """Puts an active attempt back in the queue as attempt + 1, or fails the job when attempts are exhausted.
    None when nothing moved (a late or duplicate event)."""
    with transaction.atomic():
        job = Job.objects.select_for_update().filter(pk=job_id, attempt=attempt, status__in=ACTIVE).first()
        if job is None:
            log.info("job %s: requeue of attempt %d (%s) ignored: the job already moved on", job_id, attempt, reason)
            return None
        if job.attempt >= job.max_attempts:
            error = {"code": "retries_exhausted", "message": f"gave up after {job.attempt} attempt(s): {reason}"}
            Job.objects.filter(pk=job_id).update(status=JobStatus.FAILED, finished_at=timezone.now(), error=error)
            _record(job_id, JobStatus.FAILED, attempt, worker_id, {"error": error})
            transaction.on_commit(lambda: _announce_failure(job_id, error))
            return Requeued(attempt=None)
        Job.objects.filter(pk=job_id).update(status=JobStatus.QUEUED, attempt=F("attempt") + 1, worker_id="",
                                             started_at=None, dispatched_at=timezone.now())
        _record(job_id, "requeued", attempt, worker_id, {"reason": reason, "next_attempt": attempt + 1})
        return Requeued(attempt=attempt + 1)


def _announce_failure(job_id: str, error: dict[str, str]) -> None:
    from farm.job_streams import job_stream_append
    from farm.stream_format import Failure

    job_stream_append(job_id, Failure(503, "server_error", error["code"], error["message"]))


def job_apply_event(*, job_id: str, attempt: int, kind: str, worker_id: str, detail: dict[str, Any]) -> bool:
    """Applies a worker's event. A retryable failure or a hand-back requeues (with backoff), or fails the job when
    its attempts are exhausted; anything late or duplicated is a logged no-op. Returns whether the job moved."""
    if kind == "requeue" or (kind == JobStatus.FAILED and (detail.get("error") or {}).get("retry")):
        reason = (detail.get("error") or {}).get("message") or detail.get("reason") or kind
        requeued = job_requeue(job_id=job_id, attempt=attempt, reason=reason, worker_id=worker_id)
        if requeued is not None and requeued.attempt is not None:
            delay = 0.0 if kind == "requeue" else RETRY_POLICY.delay_s(requeued.attempt)
            transaction.on_commit(lambda: job_dispatch(job_id=job_id, countdown=delay))
        return requeued is not None
    if kind not in _ALLOWED_FROM:
        log.warning("job %s: unknown event %r ignored", job_id, kind)
        return False
    return job_transition(job_id=job_id, attempt=attempt, to=kind, worker_id=worker_id, detail=detail)


def job_dispatch(*, job_id: str, countdown: float = 0.0) -> bool:
    """(Re)publishes a queued job's current attempt to its spec's queue. False if it is no longer queued."""
    from farm.dispatch import inference_publish

    job = Job.objects.select_related("spec").filter(pk=job_id, status=JobStatus.QUEUED).first()
    if job is None or job.spec is None:
        return False
    deadline = job.deadline_at.timestamp() if job.deadline_at else (timezone.now() + timedelta(hours=1)).timestamp()
    Job.objects.filter(pk=job_id).update(dispatched_at=timezone.now())
    inference_publish(job_id=str(job.pk), attempt=job.attempt, spec=job.spec.name, kind=job.kind,
                      request=job.request, deadline=deadline, countdown=countdown)
    return True


def job_get(*, job_id: str, owner_id: int) -> Job:
    """The owner's job, or 404 (another key's job is indistinguishable from a missing one)."""
    job = Job.objects.select_related("model").filter(pk=job_id, owner_id=owner_id).first()
    if job is None:
        raise NotFound(f"No job with id {job_id}.", param="job_id", code="job_not_found")
    return job


def job_cancel(*, job_id: str, owner_id: int | None, by: str = "api") -> Job:
    """Cancels a queued or running job; the worker running it aborts the engine request within a second.

    Cancelling a canceled job is a no-op; cancelling any other finished job is a 409."""
    rows = Job.objects.filter(pk=job_id) if owner_id is None else Job.objects.filter(pk=job_id, owner_id=owner_id)
    job = rows.first()
    if job is None:
        raise NotFound(f"No job with id {job_id}.", param="job_id", code="job_not_found")
    if job_transition(job_id=job_id, attempt=None, to=JobStatus.CANCELED, worker_id=by,
                      detail={"error": {"code": "canceled", "message": f"canceled by {by}"}}):
        from farm.cancellation import cancel_signal

        transaction.on_commit(lambda: cancel_signal(job_id))
    job.refresh_from_db()
    if job.status != JobStatus.CANCELED:
        raise Conflict(f"Job {job_id} already finished as {job.status}; it cannot be canceled.",
                       code="job_already_finished")
    return job


def job_is_terminal(status: str) -> bool:
    return status in TERMINAL_STATUSES


def jobs_expire(*, older_than_days: float) -> int:
    """Deletes finished jobs (and their events) older than the TTL; 0 days keeps everything. Returns the count."""
    if older_than_days <= 0:
        return 0
    cutoff = timezone.now() - timedelta(days=older_than_days)
    deleted, _ = Job.objects.filter(status__in=TERMINAL_STATUSES, finished_at__lt=cutoff).delete()
    return deleted
