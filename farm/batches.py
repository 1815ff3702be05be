"""Batches (`/v1/batches`): the request lines of an uploaded `batch` file run as ordinary inference jobs.

Each line becomes a `BatchLine` row at validation, and an inference `Job` (same kind, routing, publishing and
reliability machinery as `/v1/chat/completions`: retries, reaper, sweeper, cancel) only when it enters the batch's
in-flight window (`FARM_BATCH_WINDOW`). A control-queue tick (`batch_advance`), kicked when the batch is created or
cancelled, when one of its line jobs ends, and by beat as a safety net, moves the batch along:

    validating -> in_progress -> finalizing -> completed
        |              |  (cancel)                  ^
        v              +--> cancelling -------------+--> cancelled      (expires_at passed: expired)
      failed

At each tick: outcomes of ended line jobs are copied into their lines (a line with an outcome is never run again:
after a worker dies, only its unfinished lines run again, through the job's own requeue), the window is topped up,
counts are updated, and once every line has an outcome the output and error files are written in the OpenAI batch
format and the batch completes. One tick per batch at a time (a Redis lock); ticks are idempotent.

A cancel (or expiry) stops the lines at once: pending ones never run, in-flight jobs are cancelled and their workers
told. A running line may still finish before the abort reaches its worker; its success then wins
(`batch_line_late_success`), so the batch stays `cancelling` until every running line's worker has answered (its
success, or the usage of the aborted attempt), at most `FARM_BATCH_CANCEL_GRACE_S`, and finishes under its row lock.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import orjson
from django.core.files import File as DjangoFile
from django.db import connection, transaction
from django.db.models import Count
from django.utils import timezone

from farm import jobs, queues, redis_keys
from farm.catalog import AdapterEntry, ModelEntry, _load_models
from farm.errors import Conflict, FarmError, InvalidRequest
from farm.files import BATCH_URLS, file_create, file_get, file_iter_lines
from farm.inference import Submission
from farm.models import (
    BATCH_ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    Batch,
    BatchLine,
    BatchLineStatus,
    BatchStatus,
    File,
    FilePurpose,
    Job,
    JobEvent,
    JobStatus,
    Model,
    models_visible_to,
)
from farm.redis_client import sync_redis
from farm.registry import live_workers_sync
from farm.routing import route_request, spec_states
from farm.spec_health import spec_backoffs_sync
from settings import env

log = logging.getLogger(__name__)

COMPLETION_WINDOWS = {"24h": timedelta(hours=24)}
MAX_VALIDATION_ERRORS = 100
LOCK_TTL_S = 600
# Many lines ending within this many seconds share one tick.
TICK_DEBOUNCE_S = 0.2
# A stopped batch awaiting its running lines' workers looks again this often.
AWAIT_POLL_S = 1.0

# (url, body) -> (job kind, model name, job request); ValueError with the API's message for an invalid body.
# Supplied by the API layer, which owns the request schemas (`api.openai.batches.lines.batch_line_job`).
LineJob = Callable[[str, dict[str, Any]], tuple[str, str, dict[str, Any]]]
# (kind, submission, text, finish_reason) -> the OpenAI response body without usage (the endpoint's own shaper).
BodyShaper = Callable[[str, Submission, str, str], dict[str, Any]]


# --- API-facing services -------------------------------------------------------------------------------------------


def _check_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > 16:
        raise InvalidRequest("metadata must be an object of at most 16 keys.", param="metadata", code="invalid_value")
    for key, value in metadata.items():
        if not isinstance(value, str) or len(key) > 64 or len(value) > 512:
            raise InvalidRequest(
                "metadata keys are strings of at most 64 characters and values strings of at most 512.",
                param="metadata",
                code="invalid_value",
            )
    return metadata


def batch_create(
    *,
    owner_id: int,
    api_key_id: int | None,
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    metadata: dict[str, str] | None = None,
) -> Batch:
    """Accepts a batch in `validating`; the control worker validates its lines and runs them."""
    if endpoint not in BATCH_URLS:
        raise InvalidRequest(
            f"Invalid value for 'endpoint': {endpoint!r}; supported: {', '.join(BATCH_URLS)}.",
            param="endpoint",
            code="invalid_value",
        )
    if completion_window not in COMPLETION_WINDOWS:
        raise InvalidRequest(
            f"Invalid value for 'completion_window': {completion_window!r}; supported: 24h.",
            param="completion_window",
            code="invalid_value",
        )
    metadata = _check_metadata(metadata)
    try:
        file = file_get(file_id=input_file_id, owner_id=owner_id)
    except FarmError as exc:
        exc.param = "input_file_id"
        raise
    if file.purpose != FilePurpose.BATCH:
        raise InvalidRequest(
            f"File {input_file_id} has purpose {file.purpose!r}; a batch input file needs purpose 'batch'.",
            param="input_file_id",
            code="invalid_file_purpose",
        )
    now = timezone.now()
    with transaction.atomic():
        batch = Batch.objects.create(
            owner_id=owner_id,
            api_key_id=api_key_id,
            endpoint=endpoint,
            input_file_id=input_file_id,
            completion_window=completion_window,
            metadata=metadata,
            expires_at=now + COMPLETION_WINDOWS[completion_window],
        )
        transaction.on_commit(lambda: batch_kick(batch_id=batch.id))
    return batch


def batch_get(*, batch_id: str, owner_id: int) -> Batch:
    """The owner's batch, or 404."""
    from farm.errors import NotFound

    batch = None if "\x00" in batch_id else Batch.objects.filter(pk=batch_id, owner_id=owner_id).first()
    if batch is None:
        raise NotFound(f"No batch found with id '{batch_id}'.", param="batch_id", code="batch_not_found")
    return batch


def batch_list(*, owner_id: int, limit: int = 20, after: str | None = None) -> tuple[list[Batch], bool]:
    """One page of the owner's batches, newest first, and whether more follow."""
    rows = Batch.objects.filter(owner_id=owner_id).order_by("-created_at", "-id")
    if after and "\x00" not in after:
        anchor = Batch.objects.filter(pk=after, owner_id=owner_id).first()
        if anchor is not None:
            rows = rows.filter(created_at__lte=anchor.created_at).exclude(
                created_at=anchor.created_at, id__gte=anchor.id
            )
    page = list(rows[: limit + 1])
    return page[:limit], len(page) > limit


def batch_cancel(*, batch_id: str, owner_id: int) -> Batch:
    """Stops topping up and cancels the in-flight line jobs; finished lines keep their results. A cancelled or
    cancelling batch is a no-op; a finished one is a 409."""
    batch = batch_get(batch_id=batch_id, owner_id=owner_id)
    with transaction.atomic():
        moved = Batch.objects.filter(pk=batch_id, status__in=(BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)).update(
            status=BatchStatus.CANCELLING, cancelling_at=timezone.now()
        )
        if moved:  # the lines stop now (a tick may wait behind other control work); the next tick finalizes
            _stop(batch, code="batch_cancelled", message="This line was not executed: the batch was cancelled.")
            transaction.on_commit(lambda: batch_kick(batch_id=batch_id))
    batch.refresh_from_db()
    if not moved and batch.status not in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
        raise Conflict(f"Cannot cancel a batch with status '{batch.status}'.", code="batch_not_cancellable")
    return batch


def batch_kick(*, batch_id: str, countdown: float = 0.0) -> None:
    """Schedules a tick of the batch, unless one is already scheduled (many lines ending at once: one tick)."""
    from farm.celery import app

    if not sync_redis().set(redis_keys.batch_tick_pending(batch_id), "1", nx=True, ex=max(5, int(countdown) + 5)):
        return
    app.send_task(
        queues.BATCH_TICK_TASK.name,
        kwargs={"batch_id": batch_id},
        queue=queues.CONTROL_QUEUE,
        countdown=countdown or None,
    )


def batch_jobs_ended(*, job_ids: list[str]) -> None:
    """Jobs reached a terminal state: each batch running some of them as lines gets a tick shortly (one query)."""
    batch_lines_ended(batch_ids=set(BatchLine.objects.filter(job_id__in=job_ids).values_list("batch_id", flat=True)))


def batch_lines_ended(*, batch_ids: Iterable[Any]) -> None:
    """Line jobs of these batches ended: each batch gets a tick shortly (one for many lines)."""
    for batch_id in batch_ids:
        batch_kick(batch_id=str(batch_id), countdown=TICK_DEBOUNCE_S)


def batches_sweep() -> int:
    """The reap task (every FARM_REAP_EVERY_S): kicks every active batch (safety net for lost kicks, expiry, and lines
    waiting for a worker)."""
    ids = list(Batch.objects.filter(status__in=BATCH_ACTIVE_STATUSES).values_list("id", flat=True))
    for batch_id in ids:
        batch_kick(batch_id=batch_id)
    return len(ids)


# --- the tick ------------------------------------------------------------------------------------------------------


def batch_advance(*, batch_id: str, line_job: LineJob, shape_body: BodyShaper) -> str | None:
    """One tick (control worker): see the module docstring. Returns the batch's status afterwards, or None when
    another tick holds the batch (this one is then rescheduled)."""
    client = sync_redis()
    client.delete(redis_keys.batch_tick_pending(batch_id))
    lock = client.lock(redis_keys.batch_lock(batch_id), timeout=LOCK_TTL_S, blocking=False)
    if not lock.acquire():
        batch_kick(batch_id=batch_id, countdown=1.0)
        return None
    try:
        return _advance(batch_id, line_job, shape_body)
    finally:
        lock.release()


def _advance(batch_id: str, line_job: LineJob, shape_body: BodyShaper) -> str | None:
    batch = Batch.objects.filter(pk=batch_id).first()
    if batch is None:
        return None
    if batch.status == BatchStatus.VALIDATING:
        _validate(batch, line_job)
    elif batch.status == BatchStatus.IN_PROGRESS and batch.expires_at and batch.expires_at <= timezone.now():
        Batch.objects.filter(pk=batch.pk, status=BatchStatus.IN_PROGRESS).update(status=BatchStatus.CANCELLING)
        batch.refresh_from_db()
        _stop(batch, code="batch_expired", message="This line was not executed before the batch expired.")
        batch.status = BatchStatus.CANCELLING
    elif batch.status == BatchStatus.CANCELLING:
        _stop(batch, code="batch_cancelled", message="This line was not executed: the batch was cancelled.")
    if batch.status in (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING):
        _collect(batch, shape_body)
        if batch.status == BatchStatus.IN_PROGRESS:
            waiting = _top_up(batch)
            if waiting:  # no worker serves a line's model yet: look again soon (beat may not run)
                batch_kick(batch_id=batch.pk, countdown=2.0)
        counts = _count(batch)
        if counts[BatchLineStatus.PENDING] == 0 and counts[BatchLineStatus.SUBMITTED] == 0:
            if batch.status == BatchStatus.CANCELLING and _awaiting_workers(batch):
                batch_kick(batch_id=batch.pk, countdown=AWAIT_POLL_S)
            else:
                _finalize(batch)
    elif batch.status == BatchStatus.FINALIZING:  # a tick died while finalizing
        _finalize(batch)
    batch.refresh_from_db()
    return batch.status


def _fail_validation(batch: Batch, errors: list[dict[str, Any]]) -> None:
    Batch.objects.filter(pk=batch.pk, status=BatchStatus.VALIDATING).update(
        status=BatchStatus.FAILED, failed_at=timezone.now(), errors={"object": "list", "data": errors}
    )
    log.info("batch %s failed validation: %s", batch.pk, errors[:3])


def _validate(batch: Batch, line_job: LineJob) -> None:
    """Turns every line of the input file into a `BatchLine` (with its job request), or fails the batch with the
    OpenAI `errors` list (line-numbered)."""
    try:
        file: File = file_get(file_id=batch.input_file_id, owner_id=None)
    except FarmError:
        _fail_validation(
            batch,
            [
                {
                    "code": "file_not_found",
                    "message": "The input file was deleted.",
                    "param": "input_file_id",
                    "line": None,
                }
            ],
        )
        return
    errors: list[dict[str, Any]] = []
    lines: list[BatchLine] = []
    models: set[str] = set()
    seen: set[str] = set()
    for number, raw in enumerate(file_iter_lines(file=file), start=1):
        try:
            record = orjson.loads(raw)
            if not isinstance(record, dict):
                raise ValueError("each line must be a JSON object.")
            custom_id = record.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id or custom_id in seen:
                raise ValueError("`custom_id` must be a non-empty string, unique in the file.")
            seen.add(custom_id)
            if record.get("url") != batch.endpoint:
                raise ValueError(f"`url` {record.get('url')!r} does not match the batch's endpoint {batch.endpoint}.")
            if record.get("method") != "POST" or not isinstance(record.get("body"), dict):
                raise ValueError("`method` must be POST and `body` a JSON object.")
            kind, model, request = line_job(batch.endpoint, record["body"])
        except (ValueError, orjson.JSONDecodeError) as exc:
            errors.append({"code": "invalid_request", "message": str(exc), "param": None, "line": number})
            if len(errors) >= MAX_VALIDATION_ERRORS:
                break
            continue
        models.add(model)
        lines.append(
            BatchLine(batch=batch, index=number - 1, custom_id=custom_id, kind=kind, model=model, request=request)
        )
    visible = models_visible_to(batch.owner_id)
    known = set(Model.objects.filter(visible, name__in=models, enabled=True).values_list("name", flat=True))
    for line in lines:
        if line.model not in known and len(errors) < MAX_VALIDATION_ERRORS:
            errors.append(
                {
                    "code": "model_not_found",
                    "message": f"The model `{line.model}` does not exist.",
                    "param": "body.model",
                    "line": line.index + 1,
                }
            )
    if not lines and not errors:
        errors.append({"code": "empty_file", "message": "The input file has no lines.", "param": None, "line": None})
    if errors:
        _fail_validation(batch, errors)
        return
    with transaction.atomic():
        BatchLine.objects.filter(batch=batch).delete()  # a previous tick that died halfway
        BatchLine.objects.bulk_create(lines, batch_size=1000)
        Batch.objects.filter(pk=batch.pk, status=BatchStatus.VALIDATING).update(
            status=BatchStatus.IN_PROGRESS, in_progress_at=timezone.now(), total=len(lines)
        )
    batch.refresh_from_db()


@dataclass(frozen=True)
class _Route:
    model_id: int
    spec_id: int
    spec_name: str
    adapter: AdapterEntry | None  # a fine-tuned model: served by its base's spec with this LoRA adapter


class _Router:
    """Chooses a spec per model as the API does (`farm.routing`), from the catalogue and fleet read once per tick."""

    def __init__(self) -> None:
        self.models = _load_models()
        self.workers = live_workers_sync()[0]
        self.backoffs = spec_backoffs_sync()
        self.routes: dict[str, _Route | None] = {}

    def route(self, model_name: str) -> _Route | None:
        """A spec of the model with a live replica; None when none serves it (the line waits)."""
        if model_name not in self.routes:
            model = self.models.get(model_name)
            self.routes[model_name] = None if model is None else self._choose(model)
        return self.routes[model_name]

    def _choose(self, model: ModelEntry) -> _Route | None:
        now = time.time()
        states = spec_states([(s.name, s.weight) for s in model.specs], self.workers, now=now, backoffs=self.backoffs)
        choice = route_request(states, now=now)
        spec = next((s for s in model.specs if choice is not None and s.name == choice.name), None)
        if spec is None:
            return None
        return _Route(model_id=model.id, spec_id=spec.id, spec_name=spec.name, adapter=model.adapter)


@dataclass(frozen=True)
class _Publication:
    job_id: str
    route: _Route
    kind: str
    request: dict[str, Any]
    route_model_name: str


def _top_up(batch: Batch) -> int:
    """Creates and publishes jobs for pending lines up to the window. Returns how many lines wait for a worker.

    Jobs are the rows `jobs.job_create` makes (queued, attempt 1, the retry policy's attempts), created in one
    INSERT and linked in one UPDATE: one by one, a window of 200 took 1.3 s of a tick, which the engine waits for."""
    lines = BatchLine.objects.filter(batch=batch)
    free = env.FARM_BATCH_WINDOW - lines.filter(status=BatchLineStatus.SUBMITTED).count()
    if free <= 0:
        return 0
    pending = list(lines.filter(status=BatchLineStatus.PENDING).order_by("index")[:free])
    if not pending:
        return 0
    router = _Router()
    now = timezone.now()
    deadline = now + timedelta(seconds=env.FARM_INFERENCE_TIMEOUT_S)
    publications: list[_Publication] = []
    new_jobs: list[Job] = []
    links: list[tuple[int, str]] = []
    for line in pending:
        route = router.route(line.model)
        if route is None:
            continue
        job = Job(
            owner_id=batch.owner_id,
            api_key_id=batch.api_key_id,
            kind=line.kind,
            model_id=route.model_id,
            spec_id=route.spec_id,
            request=line.request,
            deadline_at=deadline,
            max_attempts=jobs.RETRY_POLICY.max_attempts,
            dispatched_at=now,
        )
        new_jobs.append(job)
        links.append((line.pk, str(job.pk)))
        publications.append(
            _Publication(
                job_id=str(job.pk), route=route, kind=line.kind, request=line.request, route_model_name=line.model
            )
        )
    if new_jobs:
        with transaction.atomic():
            Job.objects.bulk_create(new_jobs, batch_size=1000)
            _link_lines(links)
            transaction.on_commit(lambda: _publish(publications, deadline.timestamp()))
    return len(pending) - len(new_jobs)


def _link_lines(links: list[tuple[int, str]]) -> None:
    """Sets each line's job and marks it submitted: one UPDATE ... FROM (VALUES ...) on PostgreSQL (Django's
    `bulk_update` builds a CASE per row: 0.75 s for 200 lines), `bulk_update` elsewhere."""
    if connection.vendor != "postgresql":
        rows = [BatchLine(pk=pk, job_id=job_id, status=BatchLineStatus.SUBMITTED) for pk, job_id in links]
        BatchLine.objects.bulk_update(rows, ["job", "status"], batch_size=500)
        return
    table = BatchLine._meta.db_table
    for start in range(0, len(links), 1000):
        chunk = links[start : start + 1000]
        values = ", ".join(["(%s, %s::uuid)"] * len(chunk))
        with connection.cursor() as cursor:
            cursor.execute(
                f'UPDATE "{table}" AS line SET job_id = v.job_id, status = %s '  # table name: ours, not input
                f"FROM (VALUES {values}) AS v(id, job_id) WHERE line.id = v.id",
                [BatchLineStatus.SUBMITTED, *[value for pair in chunk for value in pair]],
            )


# Parallel publishers: one publish is a Redis round trip (~3 ms idle, several times that under load).
PUBLISH_THREADS = 8


def _publish(publications: list[_Publication], deadline: float) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from farm.dispatch import inference_adapter, inference_publish

    def publish(item: _Publication) -> None:
        adapter = item.route.adapter
        try:
            inference_publish(
                job_id=item.job_id,
                attempt=1,
                spec=item.route.spec_name,
                kind=item.kind,
                request=item.request,
                deadline=deadline,
                stream_tokens=False,  # the outcome is collected from the job row; nobody reads the tokens live
                adapter=None
                if adapter is None
                else inference_adapter(
                    job_id=item.job_id,
                    attempt=1,
                    name=item.route_model_name,
                    lora_id=adapter.lora_id,
                    file_id=adapter.file_id,
                ),
            )
        except Exception:  # broker hiccup: the reaper's sweeper publishes queued jobs whose message was lost
            log.warning("batch job %s: publish failed; the sweeper will publish it again", item.job_id, exc_info=True)

    with ThreadPoolExecutor(max_workers=PUBLISH_THREADS) as pool:
        list(pool.map(publish, publications))


def _error_response(job: Job, status_code: int, error: dict[str, Any]) -> dict[str, Any]:
    return {
        "status_code": status_code,
        "request_id": str(job.pk),
        "body": {
            "error": {
                "message": error.get("message") or "",
                "type": "server_error" if status_code >= 500 else "invalid_request_error",
                "param": None,
                "code": error.get("code"),
            }
        },
    }


def _outcome(batch: Batch, line: BatchLine, job: Job, shape_body: BodyShaper) -> None:
    """Copies an ended job's outcome into its line, as OpenAI batch output `response` / `error`."""
    canceled_by_batch = (job.error or {}).get("message") == _cancel_message(_canceler(batch.pk))
    if job.status == JobStatus.SUCCEEDED or (
        job.status == JobStatus.CANCELED and canceled_by_batch and job.result is not None  # it finished first
    ):
        result = job.result or {}
        usage = job.usage or {}
        sub = Submission(
            job_id=str(job.pk), model=line.model, spec="", created=int(job.created_at.timestamp()), deadline=0.0
        )
        body = shape_body(line.kind, sub, result.get("text", ""), result.get("finish_reason") or "stop")
        body["usage"] = {
            "prompt_tokens": usage.get("prompt_tokens", 0),
            "completion_tokens": usage.get("completion_tokens", 0),
            "total_tokens": usage.get("total_tokens", 0),
        }
        line.status = BatchLineStatus.SUCCEEDED
        line.response = {"status_code": 200, "request_id": str(job.pk), "body": body}
        line.error = None
    elif job.status == JobStatus.CANCELED and batch.status == BatchStatus.CANCELLING:
        line.status = BatchLineStatus.CANCELLED
        line.response = None
        line.error = {"code": "batch_cancelled", "message": "This line was stopped: the batch was cancelled."}
    else:
        error = job.error or {"code": job.status, "message": f"the request ended {job.status}"}
        status_code = (
            504 if job.status == JobStatus.TIMED_OUT else (500 if error.get("code") in jobs.SERVER_ERROR_CODES else 400)
        )
        if job.status == JobStatus.CANCELED:
            status_code = 499  # canceled on its own (DELETE of the job), not by the batch
        line.status = BatchLineStatus.FAILED
        line.response = _error_response(job, status_code, error)
        line.error = None


def _collect(batch: Batch, shape_body: BodyShaper) -> None:
    """Outcomes of line jobs that ended since the last tick."""
    ended = list(
        BatchLine.objects.select_related("job")
        .filter(batch=batch, status=BatchLineStatus.SUBMITTED, job__status__in=TERMINAL_STATUSES)
        .order_by("index")
    )
    for line in ended:
        _outcome(batch, line, line.job, shape_body)
    if ended:
        BatchLine.objects.bulk_update(ended, ["status", "response", "error"], batch_size=500)
    # A line whose job row vanished (deleted by hand): run it again rather than lose it.
    BatchLine.objects.filter(batch=batch, status=BatchLineStatus.SUBMITTED, job__isnull=True).update(
        status=BatchLineStatus.PENDING
    )


def _canceler(batch_id: str) -> str:
    """Who cancels a batch's line jobs (`_cancel_line_jobs`' `by`)."""
    return f"batch {batch_id}"


def _cancel_message(by: str) -> str:
    """The error message of line jobs cancelled by `by`: how a tick tells the batch's own cancels from others."""
    return f"canceled by {by}"


def _awaiting_workers(batch: Batch) -> bool:
    """Whether a line job that was running when the batch stopped has not been answered by its worker yet (neither
    its success nor its aborted attempt's usage), within `FARM_BATCH_CANCEL_GRACE_S` of the stop."""
    now = timezone.now()
    stopped_at = batch.cancelling_at or batch.expires_at or now
    if now >= stopped_at + timedelta(seconds=env.FARM_BATCH_CANCEL_GRACE_S):
        return False
    return Job.objects.filter(
        batch_line__batch=batch,
        status=JobStatus.CANCELED,
        started_at__isnull=False,
        usage__isnull=True,
        error__message=_cancel_message(_canceler(batch.pk)),
    ).exists()


def batch_line_late_success(*, job_id: str, attempt: int, worker_id: str, detail: dict[str, Any]) -> bool:
    """A success that arrived after its job was canceled: the job keeps the attempt's result and usage
    (`jobs.job_record_canceled_usage`). A line of a batch still `cancelling` goes back to `submitted`, and the tick
    that the job's end kicks puts its result in the output file. Under the batch's row lock, taken first as `_finalize`
    takes it: the output file has the line, or the batch had already ended. Returns whether the job took it."""
    batch_id = BatchLine.objects.filter(job_id=job_id).values_list("batch_id", flat=True).first()
    with transaction.atomic():
        cancelling = (
            batch_id is not None
            and Batch.objects.select_for_update().filter(pk=batch_id, status=BatchStatus.CANCELLING).exists()
        )
        if not jobs.job_record_canceled_usage(job_id=job_id, attempt=attempt, worker_id=worker_id, detail=detail):
            return False
        if cancelling:
            BatchLine.objects.filter(job_id=job_id, status=BatchLineStatus.CANCELLED).update(
                status=BatchLineStatus.SUBMITTED, error=None
            )
    return True


def _stop(batch: Batch, *, code: str, message: str) -> None:
    """Cancel or expiry: pending lines never run; in-flight line jobs are cancelled (their workers abort them)."""
    BatchLine.objects.filter(batch=batch, status=BatchLineStatus.PENDING).update(
        status=BatchLineStatus.CANCELLED, error={"code": code, "message": message}
    )
    active = BatchLine.objects.filter(
        batch=batch, status=BatchLineStatus.SUBMITTED, job__status__in=(JobStatus.QUEUED, JobStatus.RUNNING)
    ).values_list("job_id", flat=True)
    _cancel_line_jobs([str(job_id) for job_id in active], by=_canceler(batch.pk))


def _cancel_line_jobs(job_ids: list[str], *, by: str) -> None:
    """`jobs.job_cancel` for many line jobs at once: one guarded UPDATE (active -> canceled, so a job that ended
    meanwhile keeps its outcome), one INSERT of their events, one Redis round trip of cancel signals. One by one took
    27 ms a job on an idle machine (5 s for 200) and several times that under load, against a 5 s bar.
    What `job_transition` does beyond this does not apply here: usage is recorded for succeeded jobs only, and line
    jobs have no dependents."""
    if not job_ids:
        return
    error = {"code": "canceled", "message": _cancel_message(by)}
    active = (JobStatus.QUEUED, JobStatus.RUNNING)
    with transaction.atomic():
        ids = list(
            Job.objects.select_for_update()
            .filter(pk__in=job_ids, status__in=active)
            .order_by("pk")  # the order `farm.job_events` locks jobs in: the two never deadlock
            .values_list("pk", flat=True)
        )
        Job.objects.filter(pk__in=ids, status__in=active).update(
            status=JobStatus.CANCELED, finished_at=timezone.now(), error=error
        )
        JobEvent.objects.bulk_create(
            [JobEvent(job_id=i, kind=JobStatus.CANCELED, attempt=0, worker_id=by, detail={"error": error}) for i in ids]
        )
        transaction.on_commit(lambda: _cancel_signals([str(i) for i in ids]))


def _cancel_signals(job_ids: list[str]) -> None:
    """`farm.cancellation.cancel_signal` for many jobs in one pipeline (nobody streams a batch line's tokens)."""
    with sync_redis().pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.set(redis_keys.job_cancel(job_id), 1, ex=redis_keys.CANCEL_TTL_S)
            pipe.publish(redis_keys.CANCEL_CHANNEL, job_id)
        pipe.execute()


def _count(batch: Batch) -> dict[str, int]:
    rows = BatchLine.objects.filter(batch=batch).values("status").annotate(n=Count("id"))
    counts = dict.fromkeys(BatchLineStatus.values, 0)
    counts.update({row["status"]: row["n"] for row in rows})
    Batch.objects.filter(pk=batch.pk).update(
        completed=counts[BatchLineStatus.SUCCEEDED], failed=counts[BatchLineStatus.FAILED]
    )
    return counts


def _jsonl_file(records: Iterator[dict[str, Any]]) -> tempfile.SpooledTemporaryFile | None:
    """Output lines spooled to disk past 8 MiB (bounded memory); None when there are none."""
    spool = tempfile.SpooledTemporaryFile(max_size=8 << 20)  # noqa: SIM115 (returned open; the caller closes it)
    empty = True
    for record in records:
        spool.write(orjson.dumps(record) + b"\n")
        empty = False
    if empty:
        spool.close()
        return None
    spool.seek(0)
    return spool


def _output_records(batch: Batch, *, succeeded: bool) -> Iterator[dict[str, Any]]:
    statuses = (BatchLineStatus.SUCCEEDED,) if succeeded else (BatchLineStatus.FAILED, BatchLineStatus.CANCELLED)
    rows = (
        BatchLine.objects.filter(batch=batch, status__in=statuses)
        .order_by("index")
        .values("pk", "custom_id", "response", "error")
    )
    for row in rows.iterator(chunk_size=1000):
        yield {
            "id": f"batch_req_{batch.pk.removeprefix('batch_')}_{row['pk']}",
            "custom_id": row["custom_id"],
            "response": row["response"],
            "error": row["error"],
        }


def _finalize(batch: Batch) -> None:
    """Writes the output and error files and ends the batch (completed, or cancelled / expired when stopped)."""
    now = timezone.now()
    Batch.objects.filter(pk=batch.pk, status=BatchStatus.IN_PROGRESS).update(
        status=BatchStatus.FINALIZING, finalizing_at=now
    )
    with transaction.atomic():
        # The row lock orders this against `batch_line_late_success`: a line it re-opened waits for the next tick.
        locked = (
            Batch.objects.select_for_update()
            .filter(pk=batch.pk, status__in=(BatchStatus.FINALIZING, BatchStatus.CANCELLING))
            .first()
        )
        if locked is None:  # another tick finished it first
            return
        batch = locked
        counts = _count(batch)
        if counts[BatchLineStatus.PENDING] or counts[BatchLineStatus.SUBMITTED]:
            return
        expired = batch.expires_at is not None and batch.expires_at <= now and batch.cancelling_at is None
        if batch.status == BatchStatus.CANCELLING:
            final, stamp = (BatchStatus.EXPIRED, "expired_at") if expired else (BatchStatus.CANCELLED, "cancelled_at")
        else:
            final, stamp = BatchStatus.COMPLETED, "completed_at"
        usage = _usage(batch)
        ids: dict[str, str] = {}
        for field, succeeded, suffix in (("output_file_id", True, "output"), ("error_file_id", False, "error")):
            spool = _jsonl_file(_output_records(batch, succeeded=succeeded))
            if spool is None:
                continue
            with spool:
                file = file_create(
                    owner_id=batch.owner_id,
                    purpose=FilePurpose.BATCH_OUTPUT,
                    filename=f"{batch.pk}_{suffix}.jsonl",
                    content=DjangoFile(spool),
                    validate=False,
                )
            ids[field] = file.pk
        moved = Batch.objects.filter(pk=batch.pk, status__in=(BatchStatus.FINALIZING, BatchStatus.CANCELLING)).update(
            status=final,
            usage=usage,
            completed=counts[BatchLineStatus.SUCCEEDED],
            failed=counts[BatchLineStatus.FAILED],
            **ids,
            **{stamp: timezone.now()},
        )
        if not moved:  # another tick finished it first: drop these files with the transaction
            transaction.set_rollback(True)
    log.info("batch %s %s: %s", batch.pk, final, counts)


def _usage(batch: Batch) -> dict[str, int]:
    """The batch's tokens: the sum of its succeeded lines' usage."""
    usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
    for response in (
        BatchLine.objects.filter(batch=batch, status=BatchLineStatus.SUCCEEDED)
        .values_list("response", flat=True)
        .iterator(chunk_size=1000)
    ):
        line_usage = (response or {}).get("body", {}).get("usage", {})
        usage["input_tokens"] += line_usage.get("prompt_tokens", 0)
        usage["output_tokens"] += line_usage.get("completion_tokens", 0)
    usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
    return usage


def batch_line_counts(*, batch_id: str) -> dict[str, int]:
    """Lines by status (admin, tests)."""
    rows = BatchLine.objects.filter(batch_id=batch_id).values("status").annotate(n=Count("id"))
    return {row["status"]: row["n"] for row in rows}
