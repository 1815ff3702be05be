"""The job state machine. Every transition is one guarded conditional UPDATE, so a duplicate or late event
cannot move a job twice, and a terminal state is never left.

    queued -> running -> succeeded | failed | canceled | timed_out
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from django.db import transaction
from django.utils import timezone

from farm.models import TERMINAL_STATUSES, Job, JobEvent, JobStatus

log = logging.getLogger(__name__)

# Which statuses an event may move a job from.
_ALLOWED_FROM: dict[str, tuple[str, ...]] = {
    JobStatus.RUNNING: (JobStatus.QUEUED,),
    JobStatus.SUCCEEDED: (JobStatus.QUEUED, JobStatus.RUNNING),
    JobStatus.FAILED: (JobStatus.QUEUED, JobStatus.RUNNING),
    JobStatus.TIMED_OUT: (JobStatus.QUEUED, JobStatus.RUNNING),
    JobStatus.CANCELED: (JobStatus.QUEUED, JobStatus.RUNNING),
}


def job_create(
    *, owner_id: int, api_key_id: int | None, kind: str, model_id: int, spec_id: int, request: dict[str, Any],
    deadline_at: datetime,
) -> Job:
    return Job.objects.create(
        owner_id=owner_id, api_key_id=api_key_id, kind=kind, model_id=model_id, spec_id=spec_id, request=request,
        deadline_at=deadline_at,
    )


def job_apply_event(*, job_id: str, attempt: int, kind: str, worker_id: str, detail: dict[str, Any]) -> bool:
    """Applies a worker's event if the job is still in a state it may leave, for this attempt. Returns whether it
    moved; a duplicate, late or foreign event is a logged no-op."""
    allowed = _ALLOWED_FROM.get(kind)
    if allowed is None:
        log.warning("job %s: unknown event %r ignored", job_id, kind)
        return False
    now = timezone.now()
    changes: dict[str, Any] = {"status": kind}
    if kind == JobStatus.RUNNING:
        changes.update(worker_id=worker_id, started_at=now)
    else:
        changes.update(finished_at=now, usage=detail.get("usage"), result=detail.get("result"),
                       error=detail.get("error"))
    with transaction.atomic():
        moved = Job.objects.filter(pk=job_id, attempt=attempt, status__in=allowed).update(**changes)
        if moved:
            JobEvent.objects.create(job_id=job_id, kind=kind, attempt=attempt, worker_id=worker_id,
                                    detail={k: v for k, v in detail.items() if k != "result"})
    if not moved:
        log.info("job %s: event %s (attempt %d from %s) ignored: job already moved on", job_id, kind, attempt,
                 worker_id)
    return bool(moved)


def job_is_terminal(status: str) -> bool:
    return status in TERMINAL_STATUSES
