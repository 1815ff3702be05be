"""The job state machine. Every transition is one guarded conditional UPDATE (status, attempt), so a duplicate or
late event cannot move a job twice, and a terminal state is never left (a database trigger enforces that too).

    queued -> running -> succeeded | failed | canceled | timed_out
    running -> queued   (retry or hand-back: attempt + 1)
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import DEFAULT_DB_ALIAS, InterfaceError, OperationalError, connections, transaction
from django.db.models import F
from django.utils import timezone

from farm.errors import Conflict, NotFound
from farm.models import TERMINAL_STATUSES, BatchLine, Job, JobEvent, JobKind, JobStatus
from farm.request_ids import current_request_id, request_id_bound
from farm.sql import insert_rows

log = logging.getLogger(__name__)

ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
# Long jobs on `train.<hardware-class>` queues (farm.fine_tuning publishes them).
TRAINING_KINDS = (JobKind.FINE_TUNE, JobKind.EVAL_LOSS)
# Worker events that only add history to a running attempt (training progress, checkpoints); no state change.
PROGRESS_EVENTS = ("progress", "checkpoint")
# A worker's report of the tokens a canceled attempt used before its engine request was aborted.
USAGE_EVENT = "usage"

# Which statuses an event may move a job from.
_ALLOWED_FROM: dict[str, tuple[str, ...]] = {
    JobStatus.RUNNING: (JobStatus.QUEUED,),
    JobStatus.SUCCEEDED: ACTIVE,
    JobStatus.FAILED: ACTIVE,
    JobStatus.TIMED_OUT: ACTIVE,
    JobStatus.CANCELED: ACTIVE,
}


# Error codes of failed jobs that are the farm's fault (HTTP 5xx), not the request's (400).
SERVER_ERROR_CODES = {"retries_exhausted", "engine_error", "internal_error", "broker_unavailable", "spec_not_loaded"}


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
    *,
    owner_id: int,
    api_key_id: int | None,
    kind: str,
    model_id: int,
    spec_id: int | None,
    request: dict[str, Any],
    deadline_at: datetime,
    depends_on: list[str] | None = None,
    max_attempts: int | None = None,
    request_id: str = "",
) -> Job:
    """A queued job. With `depends_on` it waits (not published, `dispatched_at` empty) until those jobs succeed;
    `jobs_release_dependents` publishes it then, or fails it when one of them did not succeed."""
    job = Job.objects.create(
        owner_id=owner_id,
        api_key_id=api_key_id,
        kind=kind,
        model_id=model_id,
        spec_id=spec_id,
        request=request,
        deadline_at=deadline_at,
        max_attempts=max_attempts or RETRY_POLICY.max_attempts,
        dispatched_at=None if depends_on else timezone.now(),
        request_id=request_id,
    )
    if depends_on:
        job.depends_on.set(depends_on)
    return job


@dataclass(frozen=True)
class QueuedJob:
    """A new inference job's row as `job_insert_queued` writes it (its id chosen by the caller)."""

    id: uuid.UUID
    owner_id: int
    api_key_id: int | None
    kind: str
    model_id: int
    spec_id: int
    request: dict[str, Any]
    deadline_at: datetime
    request_id: str = ""


# What a new job's row holds in the columns a request does not set (the model's defaults, as `job_create` leaves them).
_QUEUED_DEFAULTS = {
    "status": JobStatus.QUEUED.value,
    "attempt": 1,
    "worker_id": "",
    "result": None,
    "usage": None,
    "error": None,
    "started_at": None,
    "finished_at": None,
}
# Columns whose values need their field's database adapter (the others are ints, strings and NULLs as they are).
_ADAPTED = frozenset(("id", "request", "created_at", "deadline_at", "dispatched_at"))
# Rows per INSERT statement (18 parameters each: within every backend's limit on query parameters).
QUEUED_ROWS_PER_INSERT = 200


def job_insert_queued(rows: Sequence[QueuedJob]) -> None:
    """`job_create` for the inference hot path: the same rows (queued, attempt 1, dispatched now), written as one
    multi-row INSERT without building model instances, committed together (autocommit). The ORM's create cost
    ~250 us of the API's CPU and a commit per request; here the column values still go through each field's own
    database adapter, so each row is exactly what the ORM would write (BENCHMARKS.md, 2026-12-02 evening)."""
    db = connections[DEFAULT_DB_ALIAS]  # one lookup of the thread's connection, not one per column
    fields = Job._meta.concrete_fields
    now = timezone.now()
    values = []
    for row in rows:
        row_values = {
            **_QUEUED_DEFAULTS,
            "id": row.id,
            "owner": row.owner_id,
            "api_key": row.api_key_id,
            "kind": row.kind,
            "model": row.model_id,
            "spec": row.spec_id,
            "max_attempts": RETRY_POLICY.max_attempts,
            "request": row.request,
            "created_at": now,
            "deadline_at": row.deadline_at,
            "dispatched_at": now,
            "request_id": row.request_id,
        }
        values.append(
            [
                field.get_db_prep_save(row_values[field.name], db) if field.name in _ADAPTED else row_values[field.name]
                for field in fields
            ]
        )
    with db.cursor() as cursor:
        insert_rows(cursor, Job, [field.name for field in fields], values, per_statement=QUEUED_ROWS_PER_INSERT)


def _record(job_id: str, kind: str, attempt: int, worker_id: str, detail: dict[str, Any]) -> None:
    JobEvent.objects.create(job_id=job_id, kind=kind, attempt=attempt, worker_id=worker_id, detail=detail)


def _storable(value: Any) -> Any:
    """`value` with NUL characters replaced: PostgreSQL's json/text types refuse `\\u0000`, which a model can
    generate (the tiny random test model does), and the outcome event would then fail on every retry."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {key: _storable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_storable(item) for item in value]
    return value


def job_transition(
    *, job_id: str, attempt: int | None, to: str, worker_id: str = "", detail: dict[str, Any] | None = None
) -> bool:
    """Moves the job to `to` if it is in a state that may go there (and on `attempt`, when given)."""
    detail = _storable(detail or {})
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
        if to == JobStatus.SUCCEEDED and attempt is not None:
            _start_if_queued(job_id, attempt, worker_id, now)
        moved = rows.update(**changes)
        if moved:
            _record(job_id, to, attempt or 0, worker_id, {k: v for k, v in detail.items() if k != "result"})
            if to == JobStatus.SUCCEEDED:  # once per job: only one transition to succeeded ever moves it
                from farm.usage import usage_record

                usage_record(job_id=job_id)
            if to != JobStatus.RUNNING:
                transaction.on_commit(lambda: jobs_release_dependents(job_id=job_id))
    if not moved:
        log.info("job %s: %s (attempt %s, %s) ignored: the job already moved on", job_id, to, attempt, worker_id)
    return bool(moved)


def _start_if_queued(job_id: str, attempt: int, worker_id: str, now: datetime) -> None:
    """A worker's `running` and its outcome travel as two control messages, applied by concurrent threads: a short
    attempt's success can land first. A success proves the attempt ran, so its `running` is recorded here, in
    order, and the late message then finds the job ended (a no-op). History and `started_at` stay exact."""
    started = Job.objects.filter(pk=job_id, attempt=attempt, status=JobStatus.QUEUED).update(
        status=JobStatus.RUNNING, worker_id=worker_id, started_at=now
    )
    if started:
        _record(job_id, JobStatus.RUNNING, attempt, worker_id, {"inferred": "the outcome arrived first"})


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
            transaction.on_commit(lambda: jobs_release_dependents(job_id=job_id))
            return Requeued(attempt=None)
        Job.objects.filter(pk=job_id).update(
            status=JobStatus.QUEUED,
            attempt=F("attempt") + 1,
            worker_id="",
            started_at=None,
            dispatched_at=timezone.now(),
        )
        _record(job_id, "requeued", attempt, worker_id, {"reason": reason, "next_attempt": attempt + 1})
        return Requeued(attempt=attempt + 1)


def _announce_failure(job_id: str, error: dict[str, str]) -> None:
    from farm.job_streams import job_stream_append
    from farm.stream_format import Failure

    job_stream_append(job_id, Failure(503, "server_error", error["code"], error["message"]))


def job_apply_event(*, job_id: str, attempt: int, kind: str, worker_id: str, detail: dict[str, Any]) -> bool:
    """Applies a worker's event. A retryable failure or a hand-back requeues (with backoff), or fails the job when
    its attempts are exhausted; anything late or duplicated is a logged no-op. Returns whether the job moved."""
    if kind in PROGRESS_EVENTS:
        return job_record_progress(job_id=job_id, attempt=attempt, kind=kind, worker_id=worker_id, detail=detail)
    if kind == USAGE_EVENT:
        return job_record_canceled_usage(job_id=job_id, attempt=attempt, worker_id=worker_id, detail=detail)
    if kind == JobStatus.SUCCEEDED and Job.objects.filter(pk=job_id, kind=JobKind.FINE_TUNE).exists():
        from farm.fine_tuning import fine_tune_finish  # registers the fine-tuned model with the success

        return fine_tune_finish(job_id=job_id, attempt=attempt, worker_id=worker_id, detail=detail)
    if kind == "requeue" or (kind == JobStatus.FAILED and (detail.get("error") or {}).get("retry")):
        reason = (detail.get("error") or {}).get("message") or detail.get("reason") or kind
        requeued = job_requeue(job_id=job_id, attempt=attempt, reason=reason, worker_id=worker_id)
        if requeued is not None and requeued.attempt is not None:
            from farm.failover import job_failover_dispatch  # the next live spec of the model (farm.routing)

            failed = kind != "requeue"
            delay = RETRY_POLICY.delay_s(requeued.attempt) if failed else 0.0
            transaction.on_commit(
                lambda: job_failover_dispatch(job_id=job_id, failed=failed, countdown=delay, reason=reason)
            )
        return requeued is not None
    if kind not in _ALLOWED_FROM:
        log.warning("job %s: unknown event %r ignored", job_id, kind)
        return False
    if job_transition(job_id=job_id, attempt=attempt, to=kind, worker_id=worker_id, detail=detail):
        return True
    if kind == JobStatus.SUCCEEDED:  # it finished before a cancel reached its worker: the canceled job keeps it
        from farm.batches import batch_line_late_success

        return batch_line_late_success(job_id=job_id, attempt=attempt, worker_id=worker_id, detail=detail)
    return False


def job_apply_events(
    *, events: list[dict[str, Any]], apply_alone: Callable[[dict[str, Any]], None] | None = None
) -> int:
    """Applies a worker's coalesced events (`job_apply_event` keywords) in order. Consecutive starts and successes of
    inference jobs go together, in one transaction (`farm.job_events`); every other event in its own. One
    transaction for all of them, in arrival order, would lock many job rows at once and deadlock against a batch
    cancel locking them in another order (seen: PostgreSQL aborted the cancel, a 503); both lock in id order now.
    An event that raises is handed to `apply_alone` (its own retried task) and the others still land; without
    `apply_alone`, and on a lost database connection, it raises and the whole message is retried (events are
    idempotent). Batches whose line jobs ended get a tick. Returns how many events moved a job."""
    from farm.batches import batch_jobs_ended, batch_lines_ended
    from farm.job_events import bulk_eligible, job_apply_event_run

    moved = 0
    ended: list[str] = []
    ended_batches: set[str] = set()  # found by the bulk runs themselves

    def one_by_one(run: list[dict[str, Any]]) -> None:
        nonlocal moved
        for event in run:
            try:
                if not job_apply_event(**event):
                    continue
            except (OperationalError, InterfaceError):
                raise
            except Exception:
                if apply_alone is None:
                    raise
                log.exception("job %s: event %s failed; retrying it alone", event.get("job_id"), event.get("kind"))
                apply_alone(event)
                continue
            moved += 1
            if event["kind"] not in (JobStatus.RUNNING, USAGE_EVENT, *PROGRESS_EVENTS):
                ended.append(event["job_id"])

    start = 0
    while start < len(events):
        end = start
        while end < len(events) and bulk_eligible(events[end]):
            end += 1
        if end == start:  # not for a bulk run: alone
            one_by_one(events[start : start + 1])
            start += 1
            continue
        run = events[start:end]
        start = end
        try:
            applied = job_apply_event_run(events=run)
        except (OperationalError, InterfaceError):
            raise
        except Exception:  # whatever it was, the one-by-one path applies (or hands on) each event
            log.exception("a bulk run of %d job events failed; applying them one by one", len(run))
            one_by_one(run)
            continue
        moved += applied.moved
        ended_batches.update(applied.batch_ids)
        one_by_one(applied.alone)
    if ended:  # a batch line may have ended: its batch gets a tick
        batch_jobs_ended(job_ids=ended)
    if ended_batches:
        batch_lines_ended(batch_ids=sorted(ended_batches))
    return moved


def job_record_progress(*, job_id: str, attempt: int, kind: str, worker_id: str, detail: dict[str, Any]) -> bool:
    """Adds a progress or checkpoint event to the history of a running attempt; late ones are dropped."""
    if not Job.objects.filter(pk=job_id, attempt=attempt, status=JobStatus.RUNNING).exists():
        log.info("job %s: %s of attempt %d ignored: the attempt is not running", job_id, kind, attempt)
        return False
    _record(job_id, kind, attempt, worker_id, detail)
    return True


def job_record_canceled_usage(*, job_id: str, attempt: int, worker_id: str, detail: dict[str, Any]) -> bool:
    """Stores the tokens a canceled attempt used (prompt + what it generated before the abort) on the job, and
    counts them against its key like a finished request's: the engine spent them. An attempt that finished before
    the cancel reached its worker reports its success instead: its `result` is stored too (the job stays canceled;
    a cancelling batch still puts it in its output, `farm.batches`). Once per job: only a canceled job with no usage
    yet takes it, so a duplicate event changes nothing."""
    from farm.usage import usage_record

    usage = _storable(detail.get("usage") or {})
    changes: dict[str, Any] = {"usage": usage}
    note: dict[str, Any] = {"usage": usage}
    if "result" in detail:
        changes["result"] = _storable(detail["result"])
        note["finished_before_cancel"] = True
    with transaction.atomic():
        moved = Job.objects.filter(pk=job_id, attempt=attempt, status=JobStatus.CANCELED, usage__isnull=True).update(
            **changes
        )
        if moved:
            _record(job_id, USAGE_EVENT, attempt, worker_id, note)
            usage_record(job_id=job_id)
    if not moved:
        log.info("job %s: usage of attempt %d ignored: not a canceled job without usage", job_id, attempt)
    return bool(moved)


def job_dependency_state(*, job_id: str) -> tuple[str, str | None]:
    """("ready" | "waiting" | "failed", the dependency that did not succeed): a job starts when all it depends on
    succeeded, and fails as soon as one of them ended any other way."""
    state = "ready"
    for dependency_id, status in Job.objects.filter(dependents=job_id).values_list("pk", "status"):
        if status in TERMINAL_STATUSES and status != JobStatus.SUCCEEDED:
            return "failed", str(dependency_id)
        if status != JobStatus.SUCCEEDED:
            state = "waiting"
    return state, None


def jobs_release_dependents(*, job_id: str) -> list[str]:
    """After `job_id` finished: publishes the queued jobs that waited on it and are now ready, fails those whose
    dependency did not succeed (which releases their own dependents in turn). Returns the ids published."""
    published = []
    waiting = Job.objects.filter(depends_on=job_id, status=JobStatus.QUEUED, dispatched_at__isnull=True)
    for dependent_id in waiting.values_list("pk", flat=True):
        if job_dispatch(job_id=str(dependent_id)):
            published.append(str(dependent_id))
    return published


def job_queue(job: Job) -> str | None:
    """The queue a job's messages go to: `train.<class>` for training kinds, `infer.<spec>` otherwise."""
    from farm import queues

    if job.kind in TRAINING_KINDS:
        return queues.train_queue(job.request.get("hardware_class") or "cpu")
    return queues.infer_queue(job.spec.name) if job.spec is not None else None


def job_dispatch(*, job_id: str, countdown: float = 0.0) -> bool:
    """(Re)publishes a queued job's current attempt to its queue. False if it is no longer queued, or waits on
    jobs that have not succeeded yet (a dependency that failed fails it here)."""
    from farm.dispatch import inference_publish

    job = Job.objects.select_related("spec", "model").filter(pk=job_id, status=JobStatus.QUEUED).first()
    if job is None:
        return False
    state, culprit = job_dependency_state(job_id=job_id)
    if state == "waiting":
        return False
    if state == "failed":
        job_transition(
            job_id=job_id,
            attempt=job.attempt,
            to=JobStatus.FAILED,
            worker_id="dependencies",
            detail={
                "error": {
                    "code": "dependency_failed",
                    "message": f"job {culprit}, which this job depends on, did not succeed",
                }
            },
        )
        return False
    if job.kind in TRAINING_KINDS:
        from farm.fine_tuning import training_publish

        Job.objects.filter(pk=job_id).update(dispatched_at=timezone.now())
        training_publish(job=job, countdown=countdown)
        return True
    if job.spec is None:
        return False
    deadline = job.deadline_at.timestamp() if job.deadline_at else (timezone.now() + timedelta(hours=1)).timestamp()
    Job.objects.filter(pk=job_id).update(dispatched_at=timezone.now())
    adapter = None
    if job.model is not None and job.model.adapter_file_id:  # a fine-tuned model: its base's spec + the adapter
        from farm.dispatch import inference_adapter

        adapter = inference_adapter(
            job_id=str(job.pk),
            attempt=job.attempt,
            name=job.model.name,
            lora_id=job.model.pk,
            file_id=job.model.adapter_file_id,
        )
    with request_id_bound(job.request_id or current_request_id.get()):  # a retry's worker logs keep the job's id
        inference_publish(
            job_id=str(job.pk),
            attempt=job.attempt,
            spec=job.spec.name,
            kind=job.kind,
            request=job.request,
            deadline=deadline,
            countdown=countdown,
            adapter=adapter,
            stream_tokens=not BatchLine.objects.filter(job_id=job.pk).exists(),
        )
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
    from farm.job_streams import job_stream_outcome
    from farm.stream_format import End

    if job.status in ACTIVE and isinstance(job_stream_outcome(job_id), End):
        # Its worker already answered the client; the row catches up when its events are applied.
        raise Conflict(
            f"Job {job_id} already finished as succeeded; it cannot be canceled.", code="job_already_finished"
        )
    if job_transition(
        job_id=job_id,
        attempt=None,
        to=JobStatus.CANCELED,
        worker_id=by,
        detail={"error": {"code": "canceled", "message": f"canceled by {by}"}},
    ):
        from farm.cancellation import cancel_signal

        transaction.on_commit(lambda: cancel_signal(job_id))
    job.refresh_from_db()
    if job.status != JobStatus.CANCELED:
        raise Conflict(
            f"Job {job_id} already finished as {job.status}; it cannot be canceled.", code="job_already_finished"
        )
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


RETRYABLE_STATUSES = (JobStatus.FAILED, JobStatus.TIMED_OUT)
INFERENCE_KINDS = (JobKind.CHAT, JobKind.COMPLETION)


def job_retry(*, job_id: str, by: str = "admin") -> Job:
    """Runs a failed or timed-out job again, as a NEW job (same owner, key, model, spec and request), dispatched
    after commit; returns it.

    The original is not requeued: a terminal state is final (the guarded updates and the database trigger
    enforce it), its history and usage stay as they were, and the client that sent it already got its error. The
    new job's outcome is read like any other (`GET /v1/jobs/<id>`, the admin); both jobs' events link them."""
    from settings import env

    with transaction.atomic():
        rows = Job.objects.select_for_update(of=("self",)).select_related("spec", "model")  # spec/model: nullable
        original = rows.filter(pk=job_id).first()
        if original is None:
            raise NotFound(f"No job with id {job_id}.", param="job_id", code="job_not_found")
        if original.status not in RETRYABLE_STATUSES:
            raise Conflict(
                f"Job {job_id} is {original.status}; only failed or timed-out jobs can be retried.",
                code="job_not_retryable",
            )
        if original.kind not in INFERENCE_KINDS:  # training jobs have inputs and outputs of their own
            raise Conflict(
                f"Job {job_id} is a {original.kind} job; only inference jobs can be retried here.",
                code="job_not_retryable",
            )
        if original.spec is None or not original.spec.enabled or original.model is None or not original.model.enabled:
            raise Conflict(
                f"Job {job_id}'s model or spec is gone or disabled; it cannot be retried.", code="job_not_retryable"
            )
        timeout = env.FARM_INFERENCE_TIMEOUT_S
        if original.deadline_at is not None:
            timeout = max(1.0, (original.deadline_at - original.created_at).total_seconds())
        retry = job_create(
            owner_id=original.owner_id,
            api_key_id=original.api_key_id,
            kind=original.kind,
            model_id=original.model_id,
            spec_id=original.spec_id,
            request=original.request,
            deadline_at=timezone.now() + timedelta(seconds=timeout),
        )
        _record(str(original.pk), "retried", original.attempt, by, {"retry_job_id": str(retry.pk)})
        _record(str(retry.pk), "created", 1, by, {"retry_of": str(original.pk)})
        retry_id = str(retry.pk)
        transaction.on_commit(lambda: job_dispatch(job_id=retry_id))
    log.info("job %s retried by %s as job %s", job_id, by, retry_id)
    return retry
