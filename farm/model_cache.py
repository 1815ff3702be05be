"""Model cache jobs: fill the shared model directory (FARM_MODEL_DIR) ahead of demand, so a worker that starts for
a spec finds its weights there (`POST /v1/models/{model}/cache`).

A job is a JSON document in one Redis hash (`redis_keys.MODEL_CACHE_JOBS`), kept for a week: the work is an
operator's and outlives no request, so no table is needed. It runs on the control worker (`control` queue, task
`farm.control.model_cache`), which must mount the model directory; the preparation itself is
`gpu_workers.model_store.cache_weights` (local directory copy with byte progress, GGUF conversion, hub download).

Who may start one: a key whose owner is staff, or a key whose allow-list names the model (key-scoped).
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

import orjson

from farm import queues, redis_keys
from farm.api_keys import KeyPrincipal
from farm.errors import InvalidRequest, ModelNotFound, NotFound, PermissionDenied
from farm.models import Model
from farm.redis_client import sync_redis

log = logging.getLogger(__name__)

_KEEP_S = 7 * 24 * 3600
_PROGRESS_EVERY_S = 0.5


def _save(job: dict[str, Any]) -> None:
    client = sync_redis()
    client.hset(redis_keys.MODEL_CACHE_JOBS, job["id"], orjson.dumps(job))
    client.expire(redis_keys.MODEL_CACHE_JOBS, _KEEP_S)


def model_cache_get(*, job_id: str, model_name: str | None = None) -> dict[str, Any]:
    raw = sync_redis().hget(redis_keys.MODEL_CACHE_JOBS, job_id)
    job = orjson.loads(raw) if raw else None
    if job is None or (model_name is not None and job["model"] != model_name):
        raise NotFound(f"No model cache job with id {job_id}.", param="job_id", code="cache_job_not_found")
    return job


def model_cache_list(*, model_name: str) -> list[dict[str, Any]]:
    jobs = [orjson.loads(raw) for raw in sync_redis().hvals(redis_keys.MODEL_CACHE_JOBS)]
    return sorted((job for job in jobs if job["model"] == model_name), key=lambda job: job["created_at"], reverse=True)


def model_cache_allowed(*, principal: KeyPrincipal, is_staff: bool, model_name: str) -> None:
    """Staff keys, or keys whose allow-list names this model; 403 otherwise."""
    if is_staff or model_name in principal.policy.allowed_models:
        return
    raise PermissionDenied(f"Caching `{model_name}` needs a staff key or a key whose allowed models include it.")


def model_cache_request(*, model_name: str, source: str | None, target: str | None, by: str) -> dict[str, Any]:
    """Creates a queued cache job for `model_name` (its source by default) and publishes it; returns the job."""
    from gpu_workers.model_store import cache_target
    from settings import env

    model = Model.objects.filter(name=model_name, enabled=True).first()
    if model is None:
        raise ModelNotFound(f"The model `{model_name}` does not exist or you do not have access to it.", param="model")
    source = (source or model.source or "").strip()
    if not source:
        raise InvalidRequest(
            f"`{model_name}` has no source; give one in the body.", param="source", code="missing_source"
        )
    if target is None:  # a relative source is also where workers look for it; a path or hub id gets the model name
        relative = not source.startswith(("/", "~", ".")) and "/" not in source and not source.endswith(".gguf")
        target = source if relative else model_name.replace("/", "--").replace(":", "-")
    try:
        cache_target(env.FARM_MODEL_DIR, source, target)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="target", code="invalid_target") from exc
    job = {
        "id": f"cache_{secrets.token_hex(12)}",
        "object": "model.cache_job",
        "model": model_name,
        "source": source,
        "target": target,
        "status": "queued",
        "progress": 0.0,
        "bytes_done": 0,
        "bytes_total": None,
        "error": None,
        "created_at": int(time.time()),
        "finished_at": None,
        "created_by": by,
    }
    _save(job)
    from farm.celery import app

    app.send_task(queues.MODEL_CACHE_TASK.name, kwargs={"job_id": job["id"]}, queue=queues.CONTROL_QUEUE)
    log.info("model cache job %s: %s -> %s (by %s)", job["id"], source, target, by)
    return job


def model_cache_run(*, job_id: str) -> dict[str, Any]:
    """Runs a queued job to `succeeded` or `failed`, saving its progress every half second. A job not queued any
    more (a redelivered message) is left as it is."""
    from gpu_workers.model_store import cache_weights
    from settings import env

    job = model_cache_get(job_id=job_id)
    if job["status"] != "queued":
        log.info("model cache job %s is %s already: redelivery ignored", job_id, job["status"])
        return job
    job.update(status="running", started_at=int(time.time()))
    _save(job)
    last_saved = 0.0

    def progress(done: int, total: int) -> None:
        nonlocal last_saved
        job.update(bytes_done=done, bytes_total=total, progress=round(done / total, 4) if total else 0.0)
        if time.monotonic() - last_saved >= _PROGRESS_EVERY_S or done >= total:
            last_saved = time.monotonic()
            _save(job)

    try:
        path = cache_weights(source=job["source"], model_dir=env.FARM_MODEL_DIR, name=job["target"], progress=progress)
    except Exception as exc:  # any failure of the preparation ends the job, with its reason
        log.warning("model cache job %s failed: %s", job_id, exc)
        job.update(
            status="failed",
            error={"code": "cache_failed", "message": f"{exc.__class__.__name__}: {exc}"},
            finished_at=int(time.time()),
        )
    else:
        job.update(status="succeeded", progress=1.0, path=str(path), finished_at=int(time.time()))
    _save(job)
    return job
