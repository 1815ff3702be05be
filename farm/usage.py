"""Usage per (API key, model, UTC day): requests and tokens, added once per succeeded job, read by its owner."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date

from django.db import connection
from django.db.models import QuerySet
from django.utils import timezone

from farm.models import Job, JobKind, Usage
from farm.sql import rows_query

log = logging.getLogger(__name__)

INFERENCE_KINDS = (JobKind.CHAT, JobKind.COMPLETION)  # training jobs are not token usage


def usage_record(*, job_id: str) -> bool:
    """Adds a finished job's tokens to its key's row for (model, day of finishing). Called in the transaction that
    moves the job to succeeded (`job_transition`) or stores a canceled job's usage (`job_record_canceled_usage`);
    each happens once per job, so a duplicate event changes nothing.
    Returns whether a row was written (jobs made without a key, e.g. internal ones, are not counted)."""
    job = (
        Job.objects.filter(pk=job_id, kind__in=INFERENCE_KINDS)
        .values("api_key_id", "owner_id", "model__name", "usage", "finished_at")
        .first()
    )
    if job is None or job["api_key_id"] is None or job["finished_at"] is None:
        return False
    counts = job["usage"] or {}
    usage_add(
        api_key_id=job["api_key_id"],
        owner_id=job["owner_id"],
        model=job["model__name"] or "",
        day=job["finished_at"].astimezone(UTC).date(),
        requests=1,
        prompt_tokens=int(counts.get("prompt_tokens") or 0),
        completion_tokens=int(counts.get("completion_tokens") or 0),
    )
    return True


def usage_add(
    *,
    api_key_id: int,
    owner_id: int,
    model: str,
    day: date,
    requests: int,
    prompt_tokens: int,
    completion_tokens: int,
) -> None:
    """Adds to the (key, model, day) row, creating it on the day's first job (`usage_add_rows` with one row)."""
    usage_add_rows([UsageRow(api_key_id, owner_id, model, day, requests, prompt_tokens, completion_tokens)])


@dataclass(frozen=True)
class UsageRow:
    api_key_id: int
    owner_id: int
    model: str
    day: date
    requests: int
    prompt_tokens: int
    completion_tokens: int


def usage_add_rows(rows: Sequence[UsageRow]) -> None:
    """Adds each row to its (key, model, day) row, creating the missing ones, in one statement: an INSERT ... ON
    CONFLICT DO UPDATE (PostgreSQL and SQLite) is atomic, so concurrent first jobs of a day lose no update. The
    ORM's update-then-create cost the control worker ~14 % of its CPU per run of job events (BENCHMARKS.md,
    2026-12-03 evening). Rows must have distinct (key, model, day), as one statement may not touch a row twice."""
    if not rows:
        return
    quote = connection.ops.quote_name
    table = quote(Usage._meta.db_table)
    fields = ("api_key", "owner", "model", "day", "requests", "prompt_tokens", "completion_tokens", "updated_at")
    column = {name: quote(Usage._meta.get_field(name).column) for name in fields}
    day_field, at_field = Usage._meta.get_field("day"), Usage._meta.get_field("updated_at")
    now = at_field.get_db_prep_save(timezone.now(), connection)
    values = [
        [
            *(row.api_key_id, row.owner_id, row.model, day_field.get_db_prep_save(row.day, connection)),
            *(row.requests, row.prompt_tokens, row.completion_tokens, now),
        ]
        for row in rows
    ]
    added = ("requests", "prompt_tokens", "completion_tokens")
    sets = ", ".join(f"{column[name]} = {table}.{column[name]} + EXCLUDED.{column[name]}" for name in added)
    with connection.cursor() as cursor:
        query, params = rows_query(cursor, Usage, fields, values)
        cursor.execute(
            f"INSERT INTO {table} ({', '.join(column.values())}) {query} "
            f"ON CONFLICT ({column['api_key']}, {column['model']}, {column['day']}) "
            f"DO UPDATE SET {sets}, {column['updated_at']} = EXCLUDED.{column['updated_at']}",
            params,
        )


def usage_list(*, owner_id: int, start: date, end: date, model: str | None = None) -> QuerySet[Usage]:
    """The owner's rows between two days (inclusive), oldest first, with the key's visible prefix."""
    rows = Usage.objects.filter(owner_id=owner_id, day__gte=start, day__lte=end).select_related("api_key")
    if model:
        rows = rows.filter(model=model)
    return rows.order_by("day", "model", "api_key_id")
