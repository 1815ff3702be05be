"""Accepting an inference request: find the model, route it to a spec, persist the job, publish it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db import transaction

from farm import jobs
from farm.api_keys import KeyPrincipal
from farm.catalog import ModelEntry, model_catalog
from farm.db import run_db
from farm.dispatch import inference_publish
from farm.errors import ModelNotFound, Unavailable
from farm.models import JobStatus
from farm.registry import live_workers
from farm.routing import SpecState, route_request

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5


@dataclass(frozen=True)
class Submission:
    job_id: str
    model: str
    spec: str
    created: int
    deadline: float


async def model_resolve(name: str) -> ModelEntry:
    model = (await model_catalog()).get(name)
    if model is None:
        raise ModelNotFound(f"The model `{name}` does not exist or you do not have access to it.", param="model")
    return model


async def spec_choose(model: ModelEntry) -> str:
    """Routes to a spec that has a live replica, or raises 503 with Retry-After."""
    replicas: dict[str, list[int]] = {}
    for worker in await live_workers():
        if not worker.accepts_work:
            continue
        for spec in worker.specs:
            stats = replicas.setdefault(spec, [0, 0, 0])
            stats[0] += 1
            stats[1] += worker.running
            stats[2] += worker.capacity
    states = [
        SpecState(name=s.name, weight=s.weight, live_replicas=replicas.get(s.name, [0])[0],
                  running=replicas.get(s.name, [0, 0])[1], capacity=replicas.get(s.name, [0, 0, 0])[2])
        for s in model.specs
    ]
    choice = route_request(states)
    if choice is None:
        raise Unavailable(f"No worker is serving `{model.name}` right now; retry shortly.",
                          headers={"Retry-After": str(RETRY_AFTER_S)})
    return choice.name


def _create_and_publish(*, principal: KeyPrincipal, kind: str, model: ModelEntry, spec_name: str,
                        request: dict[str, Any], deadline: float) -> str:
    spec_id = next(s.id for s in model.specs if s.name == spec_name)
    with transaction.atomic():
        job = jobs.job_create(
            owner_id=principal.owner_id, api_key_id=principal.key_id, kind=kind, model_id=model.id, spec_id=spec_id,
            request=request, deadline_at=datetime.fromtimestamp(deadline, tz=UTC),
        )
    job_id = str(job.pk)
    try:
        inference_publish(job_id=job_id, attempt=1, spec=spec_name, kind=kind, request=request, deadline=deadline)
    except Exception as exc:  # broker down: the client is told, and the row does not stay queued
        log.error("job %s: publish to %s failed: %s", job_id, spec_name, exc)
        jobs.job_apply_event(job_id=job_id, attempt=1, kind=JobStatus.FAILED, worker_id="",
                             detail={"error": {"code": "broker_unavailable", "message": str(exc)}})
        raise Unavailable("The job queue is unavailable; retry shortly.", code="broker_unavailable",
                          headers={"Retry-After": str(RETRY_AFTER_S)}) from exc
    return job_id


async def inference_submit(*, principal: KeyPrincipal, kind: str, model_name: str, request: dict[str, Any],
                           timeout_s: float) -> Submission:
    """Validated request in, queued job out (committed before its message is published)."""
    model = await model_resolve(model_name)
    spec_name = await spec_choose(model)
    now = time.time()
    deadline = now + timeout_s
    job_id = await run_db(_create_and_publish, principal=principal, kind=kind, model=model, spec_name=spec_name,
                          request=request, deadline=deadline)
    return Submission(job_id=job_id, model=model.name, spec=spec_name, created=int(now), deadline=deadline)
