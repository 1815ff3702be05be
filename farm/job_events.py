"""A worker's coalesced job events applied in bulk: the control-plane end of `gpu_workers.job_events`.

Nearly every event is an inference job starting (`running`) or answering (`succeeded`). Applied one at a time each
cost a transaction and two to eight statements (the guarded UPDATE, its history row, the fine-tune check, the
usage read and write, the dependents query): most of the control worker's CPU per request (BENCHMARKS.md,
2026-12-02). A run of them here costs a fixed handful of statements whatever its length: one locking read of its
jobs, one UPDATE of the jobs that change, one INSERT of the history, one upsert of the usage rows it adds to.

The decisions are `farm.jobs.job_transition`'s, made by a pure planner over the rows read under lock (tested
table-driven); events of other jobs (training) and of jobs that do not exist go back to the caller, to be applied
one by one in order.
"""

from __future__ import annotations

import logging
import sqlite3
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from django.db import connection, models, transaction
from django.utils import timezone

from farm.models import Job, JobEvent, JobKind, JobStatus
from farm.sql import insert_rows, rows_query

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
    changes: dict[str, Any] = field(default_factory=dict)  # columns this run writes (never the attempt)


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
    ignored. Returned in `alone`: events of jobs not in `rows` or not inference jobs, and a success of a canceled
    job on its attempt (it finished before the cancel reached its worker: `jobs.job_record_canceled_usage`)."""
    plan = Plan()
    for event in events:
        job_id, attempt, worker_id = event["job_id"], event["attempt"], event["worker_id"]
        row = rows.get(job_id)
        if row is None or row.kind not in INFERENCE_KINDS:
            plan.alone.append(event)
            continue
        detail = event["detail"]
        if event["kind"] == JobStatus.SUCCEEDED and row.status == JobStatus.CANCELED and row.attempt == attempt:
            plan.alone.append(event)
            continue
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
    batch_ids: list[str]  # batches whose line jobs ended in this run (they get a tick)
    alone: list[dict[str, Any]]  # for the caller to apply one by one, in order, after this run


def job_apply_event_run(*, events: Sequence[dict[str, Any]]) -> AppliedRun:
    """Applies a run of `bulk_eligible` events in one transaction (see the module docstring).

    The jobs are locked in id order, as `farm.batches` locks line jobs to cancel them: two bulk writers never
    deadlock each other. The statements are plain SQL on the ORM's own tables, columns and value adapters: through
    the ORM the same run cost ~3 ms of CPU per statement on the dev VM, most of it building and compiling querysets.
    """
    from farm.jobs import _storable, jobs_release_dependents
    from farm.usage import UsageRow, usage_add_rows

    events = [{**event, "detail": _storable(event["detail"])} for event in events]
    ids = sorted({event["job_id"] for event in events})
    with transaction.atomic():
        now = timezone.now()
        with connection.cursor() as cursor:
            rows, waited_on, batch_of = _read_locked(cursor, ids)
            plan = plan_event_run(events, rows, now=now)
            _write_rows(cursor, rows)
            _insert_history(cursor, plan.history, now=now)
        usage_add_rows(
            [UsageRow(key, owner, model, day, *counts) for (key, owner, model, day), counts in plan.usage.items()]
        )
        for job_id in sorted(set(plan.ended) & waited_on):
            transaction.on_commit(lambda job_id=job_id: jobs_release_dependents(job_id=job_id))
    batch_ids = sorted({batch_of[job_id] for job_id in plan.ended if job_id in batch_of})
    return AppliedRun(moved=plan.moved, batch_ids=batch_ids, alone=plan.alone)


def _q(name: str) -> str:
    return connection.ops.quote_name(name)


def _col(model: type[models.Model], name: str) -> str:
    return _q(model._meta.get_field(name).column)


def _db_value(model: type[models.Model], name: str, value: Any) -> Any:
    return model._meta.get_field(name).get_db_prep_save(value, connection)


def _read_locked(cursor: Any, ids: list[str]) -> tuple[dict[str, JobRow], set[str], dict[str, str]]:
    """The jobs' rows (locked, in id order, where the database locks rows), which of them other jobs wait on, and
    the batch each batch-line job belongs to."""
    from farm.models import BatchLine, Model

    job, pk = Job._meta, Job._meta.pk
    through = Job.depends_on.through
    sql = (
        f"SELECT j.{_q(pk.column)}, j.{_col(Job, 'kind')}, j.{_col(Job, 'status')}, j.{_col(Job, 'attempt')}, "
        f"j.{_col(Job, 'api_key')}, j.{_col(Job, 'owner')}, m.{_col(Model, 'name')}, j.{_col(Job, 'usage')}, "
        f"EXISTS (SELECT 1 FROM {_q(through._meta.db_table)} d WHERE d.{_col(through, 'to_job')} = j.{_q(pk.column)}), "
        f"(SELECT b.{_col(BatchLine, 'batch')} FROM {_q(BatchLine._meta.db_table)} b "
        f"WHERE b.{_col(BatchLine, 'job')} = j.{_q(pk.column)}) "
        f"FROM {_q(job.db_table)} j LEFT JOIN {_q(Model._meta.db_table)} m "
        f"ON m.{_q(Model._meta.pk.column)} = j.{_col(Job, 'model')} "
        f"WHERE j.{_q(pk.column)} IN ({', '.join(['%s'] * len(ids))}) ORDER BY j.{_q(pk.column)}"
    )
    if connection.features.has_select_for_update_of:
        sql += " FOR UPDATE OF j"
    cursor.execute(sql, [pk.get_db_prep_value(uuid.UUID(i), connection) for i in ids])
    usage_field = job.get_field("usage")
    rows: dict[str, JobRow] = {}
    waited_on: set[str] = set()
    batch_of: dict[str, str] = {}
    for raw_id, kind, status, attempt, key, owner, model, raw_usage, waited, batch in cursor.fetchall():
        job_id = str(pk.to_python(raw_id))
        usage = usage_field.from_db_value(raw_usage, None, connection) if raw_usage is not None else None
        rows[job_id] = JobRow(kind, status, attempt, "", None, key, owner, model or "", usage)
        if waited:
            waited_on.add(job_id)
        if batch is not None:
            batch_of[job_id] = str(BatchLine._meta.get_field("batch").to_python(batch))
    return rows, waited_on, batch_of


def update_from_supported() -> bool:
    """Whether the database has UPDATE ... FROM: SQLite only since 3.33, and Django supports 3.31."""
    return connection.vendor != "sqlite" or sqlite3.sqlite_version_info >= (3, 33)


# Jobs per UPDATE (at most 2 + 7 parameters each where they are not arrays: within every backend's limit).
ROWS_PER_UPDATE = 500


def _write_rows(cursor: Any, rows: dict[str, JobRow]) -> None:
    """The changed jobs' rows, one UPDATE per set of changed columns (nearly always one per run) from the rows as a
    query (`farm.sql.rows_query`): one statement per job cost the control worker a quarter of its CPU and PostgreSQL
    a statement each. The guard repeats what the lock ensures: the row is still active, on the attempt read."""
    shapes: dict[tuple[str, ...], list[list[Any]]] = {}
    pk = Job._meta.pk
    for job_id, row in rows.items():
        if row.changes:
            names = tuple(sorted(row.changes))
            params = [pk.get_db_prep_value(uuid.UUID(job_id), connection), row.attempt]
            params += [_db_value(Job, name, row.changes[name]) for name in names]
            shapes.setdefault(names, []).append(params)
    table = _q(Job._meta.db_table)
    active = ", ".join(f"'{status}'" for status in (JobStatus.QUEUED, JobStatus.RUNNING))
    update_from = update_from_supported()
    for names, params in shapes.items():
        if not update_from:
            assignments = ", ".join(f"{_col(Job, name)} = %s" for name in names)
            cursor.executemany(
                f"UPDATE {table} SET {assignments} WHERE {_q(pk.column)} = %s "
                f"AND {_col(Job, 'attempt')} = %s AND {_col(Job, 'status')} IN ({active})",
                [[*row_params[2:], *row_params[:2]] for row_params in params],
            )
            continue
        fields = [pk.name, "attempt", *names]
        aliases = ["id", "attempt", *(f"c{index}" for index in range(len(names)))]
        assignments = ", ".join(f"{_col(Job, name)} = v.c{index}" for index, name in enumerate(names))
        for start in range(0, len(params), ROWS_PER_UPDATE):
            query, values = rows_query(cursor, Job, fields, params[start : start + ROWS_PER_UPDATE])
            cursor.execute(
                f"WITH v ({', '.join(aliases)}) AS ({query}) "
                f"UPDATE {table} SET {assignments} FROM v WHERE {table}.{_q(pk.column)} = v.id "
                f"AND {table}.{_col(Job, 'attempt')} = v.attempt AND {table}.{_col(Job, 'status')} IN ({active})",
                values,
            )


# Rows per multi-row INSERT (6 parameters each: well within every backend's limit on query parameters).
HISTORY_ROWS_PER_INSERT = 500


def _insert_history(cursor: Any, history: list[History], *, now: datetime) -> None:
    """The history rows as multi-row INSERTs: one statement for a whole run (the database parses, plans and
    executes each statement; one per row was ~2 statements per request on the control plane's busiest table)."""
    job_pk = Job._meta.pk
    at = _db_value(JobEvent, "at", now)
    rows = [
        [
            job_pk.get_db_prep_value(uuid.UUID(h.job_id), connection),
            at,
            h.kind,
            h.attempt,
            h.worker_id,
            _db_value(JobEvent, "detail", h.detail),
        ]
        for h in history
    ]
    columns = ("job", "at", "kind", "attempt", "worker_id", "detail")
    insert_rows(cursor, JobEvent, columns, rows, per_statement=HISTORY_ROWS_PER_INSERT)
