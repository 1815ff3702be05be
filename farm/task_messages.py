"""Celery task messages built and pushed by the farm itself, for the one publish on the request path.

`app.send_task` cost ~255 us of the API's CPU per inference request (Celery builds the message through its AMQP
layer, kombu wraps it in a producer, a channel and a retrying `ensure`); this builds the same protocol-2 message
(JSON body, base64 as kombu's Redis transport stores it, the headers Celery sets) and LPUSHes it in ~75 us
(BENCHMARKS.md, 2026-12-02 evening). A Celery worker cannot tell the two apart; a test compares them field by field.
Only for a Redis broker and an immediate publish: anything else (a delay, another broker) goes through Celery.
"""

from __future__ import annotations

import base64
import os
import socket
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson

from farm.request_ids import CELERY_HEADER, current_request_id

if TYPE_CHECKING:
    from redis.client import Pipeline

# Celery's `embed` part of a protocol-2 body, for a task with no callbacks or chords.
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_ORIGIN = f"gen{os.getpid()}@{socket.gethostname()}"


def task_message(
    *,
    task: str,
    queue: str,
    kwargs: dict[str, Any],
    argsrepr: str = "()",
    kwargsrepr: str = "{}",
    request_id: str | None = None,
) -> bytes:
    """A Celery protocol-2 message for `task` with `kwargs`, routed to `queue`, as kombu's Redis transport stores
    it; `request_id` (default: the one bound now) rides in the `farm_request_id` header as `farm.request_ids` puts
    it there."""
    task_id = str(uuid.uuid4())
    body = base64.b64encode(orjson.dumps([[], kwargs, _EMBED])).decode("ascii")
    headers: dict[str, Any] = {
        "lang": "py",
        "task": task,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": argsrepr,
        "kwargsrepr": kwargsrepr,
        "origin": _ORIGIN,
        "ignore_result": None,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    if request_id is None:
        request_id = current_request_id.get()
    if request_id:
        headers[CELERY_HEADER] = request_id
    return orjson.dumps(
        {
            "body": body,
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                "correlation_id": task_id,
                "argsrepr": argsrepr,
                "kwargsrepr": kwargsrepr,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    )


def task_push_many(messages: Sequence[tuple[str, bytes]], *, pipe: Pipeline) -> None:
    """Queues the publishing of (queue, message) pairs on the Redis broker on `pipe`, which the caller executes (one
    round trip with whatever else it holds): one LPUSH per queue, in the given order (kombu's Redis transport: a
    queue is a list, consumed from its tail, priority 0). A broker that is down is retried for about 5 s
    (`farm.redis_client`), then the error is raised."""
    by_queue: dict[str, list[bytes]] = {}
    for queue, message in messages:
        by_queue.setdefault(queue, []).append(message)
    for queue, values in by_queue.items():
        pipe.lpush(queue, *values)
