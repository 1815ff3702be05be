"""New inference jobs go to the database and the broker in groups: what arrives while a write is in flight goes next.

Each job used to cost the API a thread hop, an INSERT with its own commit and a publish round trip. Here the jobs a
process accepts while its previous write is in flight wait for it and then go together: one hop to `farm.db`'s pool,
one multi-row INSERT (one commit), one round trip to Redis that opens the jobs' streams (`farm.job_streams`) and
publishes their messages. A quiet farm's job goes at once, alone, so nothing waits that did not before; a busy one
writes in groups as large as its load (PostgreSQL: ~100 us of server CPU per single-row INSERT, ~15 us per row in
groups of 8; BENCHMARKS.md, 2026-12-02 evening).

A row that the database refuses (a data error, not a lost connection) fails its group; the group is then written one
job at a time, so only that request fails. A broker that stays down fails the group's jobs (`broker_unavailable`,
their rows end `failed`) and every request of it answers 503, as a single request did.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db import DatabaseError, InterfaceError, OperationalError

from farm import jobs
from farm.db import run_db
from farm.dispatch import InferenceTask, inference_adapter, inference_publish_now
from farm.errors import FarmError, Unavailable
from farm.models import JobStatus
from farm.request_ids import request_id_bound

log = logging.getLogger(__name__)

# Retry-After of a 503 while the farm cannot take the request (no replica, no broker).
RETRY_AFTER_S = 5
# Groups written at once per process: one fills while another is in flight (the pool has more threads for the rest).
MAX_GROUPS_IN_FLIGHT = 2


@dataclass(frozen=True)
class Accepted:
    """A job written and published: its id, and its stream's opening entry (its reader starts after it)."""

    job_id: str
    stream_after: bytes


@dataclass(frozen=True)
class NewJob:
    """An accepted inference request, routed to its spec: what its row and its message hold."""

    owner_id: int
    api_key_id: int | None
    key_prefix: str
    kind: str
    model_id: int
    model_name: str
    spec_id: int
    spec_name: str
    request: dict[str, Any]
    deadline: float  # epoch seconds
    request_id: str = ""
    adapter: tuple[int, str] | None = None  # a fine-tuned model: (lora id, file id) of its adapter


async def job_intake(job: NewJob) -> Accepted:
    """Writes the job's row (queued) and then publishes its message, in this process' next group."""
    return await _intake_for_loop().submit(job)


def jobs_create_and_publish(new: Sequence[NewJob]) -> list[Accepted | FarmError]:
    """Rows first (committed), then messages: each job's acceptance, or the error its request answers with. Runs on a
    database thread. A lost database connection raises for the whole group (every request answers 503)."""
    ids = [uuid.uuid4() for _ in new]
    rows = [
        jobs.QueuedJob(
            id=job_id,
            owner_id=job.owner_id,
            api_key_id=job.api_key_id,
            kind=job.kind,
            model_id=job.model_id,
            spec_id=job.spec_id,
            request=job.request,
            deadline_at=datetime.fromtimestamp(job.deadline, tz=UTC),
            request_id=job.request_id,
        )
        for job_id, job in zip(ids, new, strict=True)
    ]
    try:
        jobs.job_insert_queued(rows)
    except (OperationalError, InterfaceError):
        raise
    except DatabaseError:
        if len(new) == 1:
            raise
        log.warning("a group of %d new jobs was refused; writing them one at a time", len(new))
        return [outcome for job in new for outcome in _alone(job)]
    for job_id, job in zip(ids, new, strict=True):
        with request_id_bound(job.request_id):
            log.info("job %s queued on %s for key %s", job_id, job.spec_name, job.key_prefix)
    tasks = [_task(str(job_id), job) for job_id, job in zip(ids, new, strict=True)]
    try:
        opened = inference_publish_now(tasks, open_streams=True)
    except Exception as exc:  # broker down: the clients are told, and the rows do not stay queued
        return [_publish_failed(task, exc) for task in tasks]
    return [Accepted(task.job_id, entry_id) for task, entry_id in zip(tasks, opened, strict=True)]


def _alone(job: NewJob) -> list[Accepted | FarmError]:
    try:
        return jobs_create_and_publish([job])
    except (OperationalError, InterfaceError):
        raise
    except DatabaseError as exc:
        log.error("job refused by the database: %s", exc)
        return [
            FarmError(
                "The server could not store this request.", status=500, type="server_error", code="internal_error"
            )
        ]


def _task(job_id: str, job: NewJob) -> InferenceTask:
    adapter = None
    if job.adapter is not None:  # a fine-tuned model: the base's spec loads the adapter (LoRA)
        lora_id, file_id = job.adapter
        adapter = inference_adapter(job_id=job_id, attempt=1, name=job.model_name, lora_id=lora_id, file_id=file_id)
    return InferenceTask(
        job_id=job_id,
        attempt=1,
        spec=job.spec_name,
        kind=job.kind,
        request=job.request,
        deadline=job.deadline,
        adapter=adapter,
        request_id=job.request_id,
    )


def _publish_failed(task: InferenceTask, exc: Exception) -> FarmError:
    with request_id_bound(task.request_id or ""):
        log.error("job %s: publish to %s failed: %s", task.job_id, task.spec, exc)
        jobs.job_apply_event(
            job_id=task.job_id,
            attempt=1,
            kind=JobStatus.FAILED,
            worker_id="",
            detail={"error": {"code": "broker_unavailable", "message": str(exc)}},
        )
    return Unavailable(
        "The job queue is unavailable; retry shortly.",
        code="broker_unavailable",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


class _Intake:
    """One event loop's groups: jobs wait in `pending` until a group slot is free, then go together."""

    def __init__(self) -> None:
        self._pending: list[tuple[NewJob, asyncio.Future[Accepted]]] = []
        self._in_flight = 0

    def submit(self, job: NewJob) -> asyncio.Future[Accepted]:
        future: asyncio.Future[Accepted] = asyncio.get_running_loop().create_future()
        self._pending.append((job, future))
        if self._in_flight < MAX_GROUPS_IN_FLIGHT:
            self._in_flight += 1
            _start(self._write_groups())
        return future

    async def _write_groups(self) -> None:
        try:
            while self._pending:
                group, self._pending = self._pending, []
                try:
                    outcomes = await run_db(jobs_create_and_publish, [job for job, _ in group])
                except Exception as exc:  # the database is unreachable: every request of the group answers so
                    for _, future in group:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), outcome in zip(group, outcomes, strict=True):
                    if future.done():  # its request was canceled meanwhile (the job runs; nobody waits)
                        continue
                    if isinstance(outcome, FarmError):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        finally:
            self._in_flight -= 1


_intakes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Intake] = weakref.WeakKeyDictionary()
_tasks: set[asyncio.Task[None]] = set()


def _intake_for_loop() -> _Intake:
    loop = asyncio.get_running_loop()
    intake = _intakes.get(loop)
    if intake is None:
        intake = _intakes[loop] = _Intake()
    return intake


def _start(coroutine: Any) -> None:
    task = asyncio.get_running_loop().create_task(coroutine)
    _tasks.add(task)  # a running task must stay referenced
    task.add_done_callback(_tasks.discard)
