"""A worker's coalesced job events applied in bulk: the control-plane end of `gpu_workers.job_events`.

Nearly every event is an inference job starting (`running`) or answering (`succeeded`). Applied one at a time each
cost a transaction and two to eight statements (the guarded UPDATE, its history row, the fine-tune check, the
usage read and write, the dependents query): most of the control worker's CPU per request (BENCHMARKS.md,
2026-12-02). A run of them here costs a fixed handful of statements whatever its length: one locking read of its
jobs, one UPDATE per job that changes, one INSERT of the history, one UPDATE per (key, model, day) of usage.

The decisions are `farm.jobs.job_transition`'s, made by a pure planner over the rows read under lock (tested
table-driven); events of other jobs (training) and of jobs that do not exist go back to the caller, to be applied
one by one in order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from django.db import transaction
from django.utils import timezone

from farm.models import Job, JobEvent, JobKind, JobStatus

log = logging.getLogger(__name__)

BULK_KINDS = (JobStatus.RUNNING, JobStatus.SUCCEEDED)
INFERENCE_KINDS = (JobKind.CHAT, JobKind.COMPLETION)
_EVENT_KEYS = frozenset(("job_id", "attempt", "kind", "worker_id", "detail"))
INFERRED_START = {"inferred": "the outcome arrived first"}  # as `farm.jobs._start_if_queued` records it


def bulk_eligible(event: dict[str, Any]) -> bool:
    """Whether an event may join a bulk run: a start or a success, in the exact shape workers send."""
    return (
        event.keys() == _EVENT_KEYS
        and event["kind"] in BULK_KINDS
        and isinstance(event["detail"], dict)
        and isinstance(event["attempt"], int)
    )


@dataclass
class JobRow:
    """What the planner knows of a job (read under lock), updated as it plans."""

    kind: str
    status: str
    attempt: int
    worker_id: str
    started_at: datetime | None
    api_key_id: int | None
    owner_id: int
    model_name: str
    usage: dict[str, Any] | None
    changes: dict[str, Any] = field(default_factory=dict)  # columns this run writes


@dataclass(frozen=True)
class History:
    job_id: str
    kind: str
    attempt: int
    worker_id: str
    detail: dict[str, Any]


@dataclass
class Plan:
    """What a run does: row changes (on `JobRow.changes`), history, usage, which events moved and which go alone."""

    history: list[History] = field(default_factory=list)
    usage: dict[tuple[int, int, str, date], list[int]] = field(default_factory=dict)  # -> [requests, prompt, compl.]
    moved: int = 0
    ended: list[str] = field(default_factory=list)
    alone: list[dict[str, Any]] = field(default_factory=list)


def plan_event_run(events: Sequence[dict[str, Any]], rows: dict[str, JobRow], *, now: datetime) -> Plan:
    """Decides a run of `bulk_eligible` events, in order, against the jobs' rows; pure (no database, no clock).

    `running` moves a queued job on its attempt; `succeeded` moves an active job on its attempt (a queued one gets
    its inferred `running` first) and adds its tokens to its key's usage. Anything else is a late or duplicate event:
    ignored. Events of jobs not in `rows` or not inference jobs are returned in `alone`."""
    plan = Plan()
    for event in events:
        job_id, attempt, worker_id = event["job_id"], event["attempt"], event["worker_id"]
        row = rows.get(job_id)
        if row is None or row.kind not in INFERENCE_KINDS:
            plan.alone.append(event)
            continue
        detail = event["detail"]
        if row.attempt != attempt or (
            row.status != JobStatus.QUEUED
            if event["kind"] == JobStatus.RUNNING
            else row.status not in (JobStatus.QUEUED, JobStatus.RUNNING)
        ):
            log.info(
                "job %s: %s (attempt %s, %s) ignored: the job already moved on",
                job_id,
                event["kind"],
                attempt,
                worker_id,
            )
            continue
        if row.status == JobStatus.QUEUED:
            row.status = JobStatus.RUNNING
            row.worker_id = worker_id
            row.started_at = now
            row.changes.update(status=row.status, worker_id=worker_id, started_at=now)
            if event["kind"] == JobStatus.SUCCEEDED:
                plan.history.append(History(job_id, JobStatus.RUNNING, attempt, worker_id, dict(INFERRED_START)))
        if event["kind"] == JobStatus.RUNNING:
            plan.history.append(History(job_id, JobStatus.RUNNING, attempt, worker_id, detail))
            plan.moved += 1
            continue
        row.status = JobStatus.SUCCEEDED
        row.changes.update(status=row.status, finished_at=now)
        for name in ("usage", "result", "error"):
            if name in detail:
                row.changes[name] = detail[name]
        row.usage = row.changes.get("usage", row.usage)
        plan.history.append(
            History(job_id, JobStatus.SUCCEEDED, attempt, worker_id, {k: v for k, v in detail.items() if k != "result"})
        )
        if row.api_key_id is not None:
            counts = row.usage or {}
            totals = plan.usage.setdefault(
                (row.api_key_id, row.owner_id, row.model_name, now.astimezone(UTC).date()), [0, 0, 0]
            )
            totals[0] += 1
            totals[1] += int(counts.get("prompt_tokens") or 0)
            totals[2] += int(counts.get("completion_tokens") or 0)
        plan.moved += 1
        plan.ended.append(job_id)
    return plan


@dataclass(frozen=True)
class AppliedRun:
    moved: int
    ended: list[str]
    alone: list[dict[str, Any]]  # for the caller to apply one by one, in order, after this run


def job_apply_event_run(*, events: Sequence[dict[str, Any]]) -> AppliedRun:
    """Applies a run of `bulk_eligible` events in one transaction (see the module docstring).

    The jobs are locked in id order, as `farm.batches` locks line jobs to cancel them: two bulk writers never
    deadlock each other."""
    from farm.jobs import _storable, jobs_release_dependents
    from farm.usage import usage_add

    events = [{**event, "detail": _storable(event["detail"])} for event in events]
    ids = sorted({event["job_id"] for event in events})
    with transaction.atomic():
        now = timezone.now()
        read = (
            Job.objects.select_for_update(of=("self",))
            .filter(pk__in=ids)
            .order_by("pk")
            .values_list(
                "pk",
                "kind",
                "status",
                "attempt",
                "worker_id",
                "started_at",
                "api_key_id",
                "owner_id",
                "model__name",
                "usage",
            )
        )
        rows = {
            str(pk): JobRow(kind, status, attempt, worker, started, key, owner, model or "", usage)
            for pk, kind, status, attempt, worker, started, key, owner, model, usage in read
        }
        plan = plan_event_run(events, rows, now=now)
        for job_id, row in rows.items():
            if row.changes:
                # The guard repeats what the lock already ensures: the row is still active on that attempt.
                Job.objects.filter(
                    pk=job_id, attempt=row.attempt, status__in=(JobStatus.QUEUED, JobStatus.RUNNING)
                ).update(**row.changes)
        JobEvent.objects.bulk_create(
            [
                JobEvent(job_id=h.job_id, kind=h.kind, attempt=h.attempt, worker_id=h.worker_id, detail=h.detail)
                for h in plan.history
            ]
        )
        for (api_key_id, owner_id, model, day), (requests, prompt, completion) in plan.usage.items():
            usage_add(
                api_key_id=api_key_id,
                owner_id=owner_id,
                model=model,
                day=day,
                requests=requests,
                prompt_tokens=prompt,
                completion_tokens=completion,
            )
        if plan.ended:
            waited_on = Job.depends_on.through.objects.filter(to_job_id__in=plan.ended)
            for job_id in sorted({str(i) for i in waited_on.values_list("to_job_id", flat=True)}):
                transaction.on_commit(lambda job_id=job_id: jobs_release_dependents(job_id=job_id))
    return AppliedRun(moved=plan.moved, ended=plan.ended, alone=plan.alone)
