"""`JobEventPublisher` on the real broker: events sent together leave as one control message, in order."""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import orjson
import pytest

from farm import queues
from farm.celery_app import create_celery_app
from farm.redis_client import sync_redis
from gpu_workers.job_events import MAX_EVENTS_PER_MESSAGE, JobEventPublisher
from settings import env

# Not the control queue itself: the suite's live farm has a control worker consuming it.
QUEUE = f"control-events-test-{uuid.uuid4().hex[:8]}"


def control_messages() -> list[tuple[str, dict[str, Any]]]:
    """(task name, kwargs) of the messages waiting in the queue (Celery on Redis: base64 JSON bodies)."""
    found = []
    for raw in reversed(sync_redis().lrange(QUEUE, 0, -1)):  # LPUSH: the oldest is last
        message = orjson.loads(raw)
        _, kwargs, _ = orjson.loads(base64.b64decode(message["body"]))
        found.append((message["headers"]["task"], kwargs))
    return found


@pytest.fixture
def publisher():
    sync_redis().delete(QUEUE)
    app = create_celery_app(broker_url=env.REDIS_URL, main="job-events-test")
    yield JobEventPublisher(app, "worker-x", window_s=0.05, queue=QUEUE)
    sync_redis().delete(QUEUE)
    app.close()


def wait_messages(count: int) -> list[tuple[str, dict[str, Any]]]:
    deadline = time.monotonic() + 10
    while len(messages := control_messages()) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return messages


def test_events_of_the_same_moment_travel_as_one_message_in_order(publisher: JobEventPublisher) -> None:
    publisher.send(job_id="j1", attempt=1, kind="running")
    publisher.send(job_id="j2", attempt=1, kind="running")
    publisher.send(job_id="j1", attempt=1, kind="succeeded", usage={"completion_tokens": 3})
    (message,) = wait_messages(1)
    assert message[0] == queues.JOB_EVENTS_TASK.name
    assert message[1]["events"] == [
        {"job_id": "j1", "attempt": 1, "kind": "running", "worker_id": "worker-x", "detail": {}},
        {"job_id": "j2", "attempt": 1, "kind": "running", "worker_id": "worker-x", "detail": {}},
        {
            "job_id": "j1",
            "attempt": 1,
            "kind": "succeeded",
            "worker_id": "worker-x",
            "detail": {"usage": {"completion_tokens": 3}},
        },
    ]
    time.sleep(0.2)
    assert len(control_messages()) == 1  # nothing sent twice

    publisher.send(job_id="j2", attempt=1, kind="failed")  # a later moment: a message of its own
    assert [m[1]["events"][0]["kind"] for m in wait_messages(2)] == ["running", "failed"]


def test_flush_sends_everything_pending_in_bounded_messages(publisher: JobEventPublisher) -> None:
    count = MAX_EVENTS_PER_MESSAGE + 3
    with publisher._publishing:  # hold the background thread back: everything is pending at the flush
        for i in range(count):
            publisher.send(job_id=f"j{i}", attempt=1, kind="running")
    publisher.flush()
    sizes = [len(kwargs["events"]) for _, kwargs in control_messages()]
    assert sizes == [MAX_EVENTS_PER_MESSAGE, 3]
    sent = [event["job_id"] for _, kwargs in control_messages() for event in kwargs["events"]]
    assert sent == [f"j{i}" for i in range(count)]
