"""Operator commands to live workers (drain, quarantine, resume), sent on a Redis pub/sub channel that every worker
listens to (`gpu_workers.runtime.WorkerRuntime.listen_for_control`). The worker applies it and reports its new
status in its next heartbeat, which is where the admin and routing read it from."""

from __future__ import annotations

import logging

import orjson

from farm import redis_keys
from farm.errors import InvalidRequest, NotFound
from farm.redis_client import sync_redis

log = logging.getLogger(__name__)


def worker_control_send(*, worker_id: str, action: str, by: str = "admin") -> int:
    """Sends `action` to a live worker. Returns how many listeners received the message (each worker process
    listens; only the addressed one acts). 404 when the worker has no live registry entry, 400 for an unknown
    action."""
    if action not in redis_keys.WORKER_ACTIONS:
        raise InvalidRequest(
            f"Unknown worker action {action!r}; use one of {', '.join(redis_keys.WORKER_ACTIONS)}.",
            param="action",
            code="invalid_action",
        )
    client = sync_redis()
    if not client.exists(redis_keys.worker(worker_id)):
        raise NotFound(f"Worker {worker_id} is not live (no heartbeat).", param="worker_id", code="worker_not_found")
    payload = orjson.dumps({"worker_id": worker_id, "action": action, "by": by})
    receivers = int(client.publish(redis_keys.WORKER_CONTROL_CHANNEL, payload))
    log.warning("%s sent %s to worker %s (%d listener(s))", by, action, worker_id, receivers)
    return receivers


def worker_drain(*, worker_id: str, by: str = "admin") -> int:
    """Stop taking work; running jobs finish. Undo with `worker_resume`."""
    return worker_control_send(worker_id=worker_id, action="drain", by=by)


def worker_quarantine(*, worker_id: str, by: str = "admin") -> int:
    """Stop taking work and report unhealthy (routing skips it). Undo with `worker_resume`."""
    return worker_control_send(worker_id=worker_id, action="quarantine", by=by)


def worker_resume(*, worker_id: str, by: str = "admin") -> int:
    """Take work again after a drain or quarantine (not after a shutdown drain)."""
    return worker_control_send(worker_id=worker_id, action="resume", by=by)
