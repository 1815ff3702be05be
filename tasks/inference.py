"""Inference tasks on `infer.<spec>` queues. On a Redis 7+ broker workers take these messages without Celery's
consumer (`gpu_workers.queue_consumer`); this task runs them on other brokers, or with FARM_WORKER_CONSUMER=celery."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from celery.exceptions import Reject

from farm import queues

log = logging.getLogger(__name__)


@shared_task(name=queues.INFER_TASK.name, acks_late=True, ignore_result=True)
def generate(**payload: Any) -> None:
    """Runs one inference job on this worker's shared engine (see `gpu_workers.runtime`)."""
    from gpu_workers import runtime
    from gpu_workers.inference import InferenceMessage, outcome_log

    message = InferenceMessage.from_kwargs(payload)
    log.debug("job %s attempt %d received on %s", message.job_id, message.attempt, message.spec)
    try:
        outcome = runtime.current().run_inference(message)
    except runtime.ClaimFailed as exc:  # nothing ran: back to the queue, for this worker or another
        log.warning("%s; message requeued", exc)
        raise Reject(str(exc), requeue=True) from exc
    if outcome is not None:
        outcome_log(message, outcome)
