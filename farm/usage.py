"""Usage per (API key, model, UTC day): requests and tokens, added once per succeeded job, read by its owner."""

from __future__ import annotations

import logging
from datetime import UTC, date

from django.db import IntegrityError, transaction
from django.db.models import F, QuerySet

from farm.models import Job, JobKind, Usage

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
    """Adds to the (key, model, day) row, creating it on the day's first job. Concurrently safe: an UPDATE ... SET
    n = n + x is atomic, and a racing first INSERT loses to the unique constraint and adds instead."""
    key = {"api_key_id": api_key_id, "model": model, "day": day}
    increments = {
        "requests": F("requests") + requests,
        "prompt_tokens": F("prompt_tokens") + prompt_tokens,
        "completion_tokens": F("completion_tokens") + completion_tokens,
    }
    if Usage.objects.filter(**key).update(**increments):
        return
    try:
        with transaction.atomic():
            Usage.objects.create(
                **key,
                owner_id=owner_id,
                requests=requests,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
            )
    except IntegrityError:
        Usage.objects.filter(**key).update(**increments)


def usage_list(*, owner_id: int, start: date, end: date, model: str | None = None) -> QuerySet[Usage]:
    """The owner's rows between two days (inclusive), oldest first, with the key's visible prefix."""
    rows = Usage.objects.filter(owner_id=owner_id, day__gte=start, day__lte=end).select_related("api_key")
    if model:
        rows = rows.filter(model=model)
    return rows.order_by("day", "model", "api_key_id")
