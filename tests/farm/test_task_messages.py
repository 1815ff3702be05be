"""The farm's own Celery messages (the request path's publish) are the messages Celery itself would send."""

from __future__ import annotations

import base64
import json
import uuid

import pytest

from farm import queues
from farm.dispatch import inference_publish
from farm.redis_client import sync_redis
from farm.request_ids import CELERY_HEADER, request_id_bound
from farm.task_messages import task_message

SPEC = f"task-messages-{uuid.uuid4().hex[:8]}"
KWARGS = {
    "job_id": "j-1",
    "attempt": 1,
    "spec": SPEC,
    "kind": "chat.completion",
    "request": {"n": "é"},
    "deadline": 1.5,
}
# Celery adds a reply address for results; farm tasks have none (`task_ignore_result`), and a worker ignores it.
CELERY_ONLY_PROPERTIES = {"reply_to"}
PER_MESSAGE = {"id", "root_id", "origin"}  # ids and the publishing process


@pytest.fixture
def queue() -> str:
    name = queues.infer_queue(SPEC)
    sync_redis().delete(name)
    yield name
    sync_redis().delete(name)


def _popped(queue: str) -> dict:
    raw = sync_redis().rpop(queue)
    assert raw is not None, f"nothing was published to {queue}"
    return json.loads(raw)


def _celery_published(queue: str) -> dict:
    from farm.celery import app

    with request_id_bound("req_celery"):
        app.send_task(queues.INFER_TASK.name, kwargs=KWARGS, argsrepr="()", kwargsrepr="{'x'}", queue=queue)
    return _popped(queue)


def test_a_farm_message_is_celerys_message(queue: str) -> None:
    celery = _celery_published(queue)
    with request_id_bound("req_celery"):
        ours = json.loads(task_message(task=queues.INFER_TASK.name, queue=queue, kwargs=KWARGS, kwargsrepr="{'x'}"))

    assert ours.keys() == celery.keys()
    assert {k: v for k, v in ours.items() if k not in ("body", "headers", "properties")} == {
        k: v for k, v in celery.items() if k not in ("body", "headers", "properties")
    }
    assert json.loads(base64.b64decode(ours["body"])) == json.loads(base64.b64decode(celery["body"]))
    assert {k: v for k, v in ours["headers"].items() if k not in PER_MESSAGE} == {
        k: v for k, v in celery["headers"].items() if k not in PER_MESSAGE
    }
    assert ours["headers"][CELERY_HEADER] == "req_celery"
    assert ours["headers"]["root_id"] == ours["headers"]["id"] == ours["properties"]["correlation_id"]
    celery_properties = {k: v for k, v in celery["properties"].items() if k not in CELERY_ONLY_PROPERTIES}
    ids = {"correlation_id", "delivery_tag"}
    assert {k: v for k, v in ours["properties"].items() if k not in ids} == {
        k: v for k, v in celery_properties.items() if k not in ids
    }
    assert ours["properties"]["delivery_tag"] != celery["properties"]["delivery_tag"]


def test_inference_publish_pushes_the_message_to_the_specs_queue(queue: str) -> None:
    inference_publish(
        job_id="j-2", attempt=2, spec=SPEC, kind="chat.completion", request={"messages": []}, deadline=9.0
    )
    message = _popped(queue)
    args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert args == [] and kwargs["job_id"] == "j-2" and kwargs["attempt"] == 2 and kwargs["spec"] == SPEC
    assert message["headers"]["task"] == queues.INFER_TASK.name
    assert message["properties"]["delivery_info"]["routing_key"] == queue
    assert sync_redis().llen(queue) == 0


def test_a_delayed_publish_still_goes_through_celery(queue: str) -> None:
    """A retry's backoff (`countdown`) is Celery's ETA: the message carries it, the worker holds it until then."""
    inference_publish(
        job_id="j-3", attempt=2, spec=SPEC, kind="chat.completion", request={}, deadline=9.0, countdown=30
    )
    assert _popped(queue)["headers"]["eta"] is not None
