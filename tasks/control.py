"""Control-plane tasks (control worker, Django-enabled): job events -> database, registry mirror, catalogue."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from farm import queues

log = logging.getLogger(__name__)

# Job events are the control worker's high-volume traffic (one or two messages per request): Celery's task events
# for them (three broker messages each, read only by Flower's task views) cost more CPU than applying them. Flower
# still lists the control worker and its other tasks; every job's own history is its events in the admin.
SEND_JOB_EVENT_TASK_EVENTS = False


@shared_task(
    name=queues.JOB_EVENT_TASK.name,
    acks_late=True,
    send_events=SEND_JOB_EVENT_TASK_EVENTS,
    ignore_result=True,
    autoretry_for=(Exception,),
    retry_backoff=True,
    retry_backoff_max=30,
    retry_jitter=True,
    max_retries=queues.JOB_EVENT_TASK.max_retries,
)
def job_event(*, job_id: str, attempt: int, kind: str, worker_id: str, detail: dict[str, Any]) -> None:
    """Persists one event (an event of a coalesced message that failed there); duplicates and late events are
    no-ops (guarded update)."""
    from farm.jobs import job_apply_events

    job_apply_events(
        events=[{"job_id": job_id, "attempt": attempt, "kind": kind, "worker_id": worker_id, "detail": detail}]
    )


@shared_task(
    name=queues.JOB_EVENTS_TASK.name,
    acks_late=True,
    send_events=SEND_JOB_EVENT_TASK_EVENTS,
    ignore_result=True,
    autoretry_for=(Exception,),
    retry_backoff=True,
    retry_backoff_max=30,
    retry_jitter=True,
    max_retries=queues.JOB_EVENTS_TASK.max_retries,
)
def job_events(*, events: list[dict[str, Any]]) -> None:
    """Persists a worker's coalesced events, in order (`farm.jobs.job_apply_events`)."""
    from farm.jobs import job_apply_events

    job_apply_events(events=events, apply_alone=lambda event: job_event.delay(**event))


@shared_task(
    name=queues.REAP_TASK.name,
    ignore_result=True,
    soft_time_limit=queues.REAP_TASK.soft_time_limit_s,
    time_limit=queues.REAP_TASK.time_limit_s,
)
def reap() -> None:
    """Periodic: requeue jobs of silent workers, time out expired ones, republish lost ones, refresh the catalogue,
    kick every active batch (lost kicks, expiry, lines waiting for a worker)."""
    from farm.batches import batches_sweep
    from farm.catalog import spec_catalog_publish
    from farm.reaper import jobs_reap

    jobs_reap()
    spec_catalog_publish()
    batches_sweep()


@shared_task(
    name=queues.EXPIRE_TASK.name,
    ignore_result=True,
    soft_time_limit=queues.EXPIRE_TASK.soft_time_limit_s,
    time_limit=queues.EXPIRE_TASK.time_limit_s,
)
def expire_jobs() -> None:
    """Periodic: delete finished jobs older than FARM_JOB_TTL_DAYS."""
    from farm.jobs import jobs_expire
    from settings import env

    jobs_expire(older_than_days=env.FARM_JOB_TTL_DAYS)


@shared_task(
    name=queues.BATCH_TICK_TASK.name,
    acks_late=True,
    ignore_result=True,
    soft_time_limit=queues.BATCH_TICK_TASK.soft_time_limit_s,
    time_limit=queues.BATCH_TICK_TASK.time_limit_s,
    autoretry_for=(Exception,),
    retry_backoff=True,
    retry_backoff_max=30,
    retry_jitter=True,
    max_retries=queues.BATCH_TICK_TASK.max_retries,
)
def batch_tick(*, batch_id: str) -> None:
    """Advances one batch (validate, collect outcomes, top up its window, finalize); idempotent."""
    from api.openai.batches.lines import batch_line_job, batch_response_body
    from farm.batches import batch_advance

    batch_advance(batch_id=batch_id, line_job=batch_line_job, shape_body=batch_response_body)


@shared_task(
    name=queues.MODEL_CACHE_TASK.name,
    acks_late=True,
    ignore_result=True,
    soft_time_limit=queues.MODEL_CACHE_TASK.soft_time_limit_s,
    time_limit=queues.MODEL_CACHE_TASK.time_limit_s,
)
def model_cache(*, job_id: str) -> None:
    """Prepares a model's weights into the shared model directory (`farm.model_cache`); idempotent."""
    from farm.model_cache import model_cache_run

    model_cache_run(job_id=job_id)


def _publish_catalog_on_start(**_: Any) -> None:
    """Workers waiting for their spec definitions get them as soon as the control worker is up."""
    from farm.catalog import spec_catalog_publish

    log.info("published %d spec(s) to the catalogue", spec_catalog_publish())


def _connect_signals() -> None:
    from celery.signals import worker_ready

    worker_ready.connect(_publish_catalog_on_start, weak=False)


_connect_signals()
