"""`QueueConsumer` on real Redis: messages as the API publishes them, run on the engine loop with the zero-cost engine
(this is about taking, claiming and acking messages, not about generation)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from farm import queues, redis_keys, stream_format
from farm.celery_app import create_celery_app
from farm.redis_client import sync_redis
from farm.request_ids import RequestIdFilter
from farm.stream_format import Delta, End
from farm.task_messages import task_message
from gpu_workers.engine import EngineConfig
from gpu_workers.engine_host import EngineHost
from gpu_workers.engine_pool import EnginePool
from gpu_workers.job_events import JobEventPublisher
from gpu_workers.null_engine import NullEngine
from gpu_workers.queue_consumer import UNACKED_INDEX_KEY, UNACKED_KEY, QueueConsumer, message_decode
from gpu_workers.runtime import WorkerRuntime
from settings import env

SPEC = "consumer-test-spec"


@dataclass
class Rig:
    runtime: WorkerRuntime
    engine: NullEngine
    queue: str
    events: list[dict[str, Any]]
    consumer: QueueConsumer | None = None

    def start(self, *, concurrency: int = 8, also: tuple[str, ...] = ()) -> QueueConsumer:
        self.consumer = QueueConsumer(
            runtime=self.runtime,
            client=self.runtime.host.redis,
            queue_names=[self.queue, *also],
            concurrency=concurrency,
        )

        async def start() -> None:
            self.consumer.start()

        self.runtime.host.run(start())
        return self.consumer

    def publish(
        self,
        job_id: str,
        *,
        attempt: int = 1,
        max_tokens: int = 4,
        deadline_in: float = 60.0,
        request: dict[str, Any] | None = None,
    ) -> bytes:
        raw = task_message(
            task=queues.INFER_TASK.name,
            queue=self.queue,
            kwargs={
                "job_id": job_id,
                "attempt": attempt,
                "spec": SPEC,
                "kind": "chat.completion",
                "request": {"messages": [{"role": "user", "content": "one two three"}], "max_tokens": max_tokens}
                | (request or {}),
                "deadline": time.time() + deadline_in,
            },
            request_id="req-" + job_id[:8],
        )
        sync_redis().lpush(self.queue, raw)
        return raw

    def outcomes(self, job_id: str) -> list[str]:
        terminal = {"succeeded", "failed", "timed_out", "canceled", "requeue", "usage"}
        return [event["kind"] for event in self.events if event["job_id"] == job_id and event["kind"] in terminal]

    def wait_outcomes(self, job_ids: list[str], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.outcomes(job_id) for job_id in job_ids):
                return
            time.sleep(0.02)
        raise AssertionError(f"no outcome for {[j for j in job_ids if not self.outcomes(j)]}: {self.events}")


@pytest.fixture
def rig() -> Iterator[Rig]:
    host = EngineHost(redis_url=env.REDIS_URL)
    config = EngineConfig(spec_name=SPEC, model_path=Path("/nonexistent"))
    engine = NullEngine(config)
    app = create_celery_app(broker_url=env.REDIS_URL, main="farm-worker-test")
    runtime = WorkerRuntime(
        worker_id="consumer-worker",
        redis_url=env.REDIS_URL,
        host=host,
        events=JobEventPublisher(app, "consumer-worker"),
        engines=EnginePool(
            configs={SPEC: config}, need_bytes={}, budget_bytes=0, load=lambda _: engine, unload=lambda *_: None
        ),
    )
    runtime.engines.load_now(SPEC)
    events: list[dict[str, Any]] = []
    runtime.events.send = lambda **event: events.append(event)  # type: ignore[method-assign]
    made = Rig(runtime=runtime, engine=engine, queue=queues.infer_queue(f"test-{uuid.uuid4().hex[:12]}"), events=events)
    yield made
    if made.consumer is not None:
        host.run(made.consumer.stop(5.0))
    sync_redis().delete(made.queue)
    runtime.redis.close()
    host.close()


def stream_events(job_id: str) -> list[Any]:
    return [
        stream_format.decode(fields[stream_format.FIELD.encode()])
        for _, fields in sync_redis().xrange(redis_keys.job_stream(job_id))
    ]


def unacked(tags: list[str]) -> list[bytes | None]:
    return sync_redis().hmget(UNACKED_KEY, tags)


def test_messages_run_to_their_end_and_leave_no_unacked_record(rig: Rig) -> None:
    jobs = [str(uuid.uuid4()) for _ in range(5)]
    tags = [message_decode(rig.publish(job_id))[1] for job_id in jobs]
    rig.start()
    rig.wait_outcomes(jobs)
    for job_id in jobs:
        assert rig.outcomes(job_id) == ["succeeded"]
        events = stream_events(job_id)
        assert "".join(e.text for e in events[:-1]) == " tok" * 4
        assert events[-1] == End(finish_reason="length", prompt_tokens=3, completion_tokens=4)
        assert sync_redis().get(redis_keys.job_claim(job_id, 1)) == b"consumer-worker"
    deadline = time.monotonic() + 5
    while any(unacked(tags)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert unacked(tags) == [None] * len(tags)
    assert sync_redis().zscore(UNACKED_INDEX_KEY, tags[0]) is None
    assert sync_redis().llen(rig.queue) == 0
    sync_redis().delete(*(redis_keys.job_stream(j) for j in jobs), *(redis_keys.job_claim(j, 1) for j in jobs))


def test_a_client_that_waits_for_the_whole_answer_gets_it_in_one_delta(rig: Rig) -> None:
    """`stream: false`: one Redis write (and one API wake-up) for the text, not one per engine step."""
    rig.engine.token_interval_s = 0.05  # steps far enough apart that the writer flushes them apart
    whole, live = str(uuid.uuid4()), str(uuid.uuid4())
    rig.publish(whole, request={"stream": False})
    rig.publish(live, request={"stream": True})
    rig.start()
    rig.wait_outcomes([whole, live])
    end = End(finish_reason="length", prompt_tokens=3, completion_tokens=4)
    assert stream_events(whole) == [Delta(" tok" * 4, 4), end]
    *deltas, last = stream_events(live)
    assert last == end and len(deltas) > 1 and "".join(d.text for d in deltas) == " tok" * 4
    sync_redis().delete(*(redis_keys.job_stream(j) for j in (whole, live)))


def test_a_running_message_has_kombus_unacked_record(rig: Rig) -> None:
    """While its job runs a message is recorded as kombu records it (`[payload, exchange, routing key]` under its
    delivery tag, indexed by time): after a crash, kombu's restore puts it back on its queue."""
    rig.engine.token_interval_s = 0.2
    job_id = str(uuid.uuid4())
    raw = rig.publish(job_id, max_tokens=20)
    tag = message_decode(raw)[1]
    before = time.time()
    rig.start()
    deadline = time.monotonic() + 5
    while not rig.runtime.running_jobs() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rig.runtime.running_jobs() == [job_id]
    [record] = unacked([tag])
    assert record is not None
    assert orjson.loads(record) == [orjson.loads(raw), "", rig.queue]
    assert before - 1 <= sync_redis().zscore(UNACKED_INDEX_KEY, tag) <= time.time()
    assert rig.runtime.stop_job(job_id, "canceled")
    rig.wait_outcomes([job_id])
    assert rig.outcomes(job_id) == ["usage"]  # canceled by whoever canceled; what ran still counts
    sync_redis().delete(redis_keys.job_stream(job_id), redis_keys.job_claim(job_id, 1))


def test_kombu_restores_a_message_whose_worker_died(rig: Rig) -> None:
    """The record is the one kombu's own restore reads: a message left unacked past the visibility timeout goes back
    to its queue, whole."""
    rig.engine.token_interval_s = 0.2
    job_id = str(uuid.uuid4())
    raw = rig.publish(job_id, max_tokens=50)
    consumer = rig.start()
    deadline = time.monotonic() + 5
    while not rig.runtime.running_jobs() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rig.runtime.running_jobs() == [job_id], "the job did not start within 5 s"
    consumer.pause()  # else it would take the restored copy at once (and its claim would turn it away)
    time.sleep(1.2)

    def restore(**transport_options: float) -> None:
        """What any Celery consumer of the broker runs every few seconds (kombu's `QoS.restore_visible`), under a
        mutex of its own: a consumer that shares this Redis database (the live farm's control worker, in a whole
        run) holds kombu's `unacked_mutex` now and then, and `restore_visible` then silently restores nothing."""
        app = create_celery_app(broker_url=env.REDIS_URL, main="farm-restore-test")
        app.conf.broker_transport_options = {
            **app.conf.broker_transport_options,
            "unacked_mutex_key": f"unacked_mutex-{job_id}",
            **transport_options,
        }
        with app.connection_for_read() as connection:
            connection.default_channel.qos.restore_visible(start=0, num=10_000, interval=1)

    restore()  # the farm's visibility timeout (an hour) has not passed: nothing comes back
    assert sync_redis().lrange(rig.queue, 0, -1) == []
    restore(visibility_timeout=0)  # as if the worker had died an hour ago
    restored_all = sync_redis().lrange(rig.queue, 0, -1)
    assert len(restored_all) == 1, restored_all
    [restored] = restored_all
    expected = orjson.loads(raw)
    expected["headers"]["redelivered"] = expected["properties"]["delivery_info"]["redelivered"] = True
    assert orjson.loads(restored) == expected
    rig.runtime.stop_job(job_id, "canceled")
    rig.wait_outcomes([job_id])
    sync_redis().delete(redis_keys.job_stream(job_id), redis_keys.job_claim(job_id, 1))


def test_a_duplicate_delivery_runs_once(rig: Rig) -> None:
    job_id = str(uuid.uuid4())
    rig.publish(job_id)
    rig.publish(job_id)  # the sweeper re-published it, or kombu restored it
    rig.start()
    rig.wait_outcomes([job_id])
    time.sleep(0.3)
    assert rig.outcomes(job_id) == ["succeeded"]
    assert [e["kind"] for e in rig.events if e["job_id"] == job_id].count("running") == 1
    assert sync_redis().llen(rig.queue) == 0
    sync_redis().delete(redis_keys.job_stream(job_id), redis_keys.job_claim(job_id, 1))


def test_a_job_canceled_before_it_starts_does_not_run(rig: Rig) -> None:
    job_id = str(uuid.uuid4())
    sync_redis().set(redis_keys.job_cancel(job_id), 1, ex=60)
    rig.publish(job_id)
    rig.start()
    deadline = time.monotonic() + 5
    while sync_redis().llen(rig.queue) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    assert [e["kind"] for e in rig.events if e["job_id"] == job_id] == []  # nothing ran, nothing to report
    assert stream_events(job_id) == []
    sync_redis().delete(redis_keys.job_cancel(job_id), redis_keys.job_claim(job_id, 1))


def test_no_more_jobs_run_at_once_than_the_concurrency(rig: Rig) -> None:
    rig.engine.token_interval_s = 0.05
    jobs = [str(uuid.uuid4()) for _ in range(6)]
    for job_id in jobs:
        rig.publish(job_id, max_tokens=6)
    rig.start(concurrency=2)
    most = 0
    deadline = time.monotonic() + 20
    while not all(rig.outcomes(j) for j in jobs) and time.monotonic() < deadline:
        most = max(most, len(rig.runtime.running_jobs()))
        time.sleep(0.005)
    assert [rig.outcomes(j) for j in jobs] == [["succeeded"]] * 6
    assert most == 2
    sync_redis().delete(*(redis_keys.job_stream(j) for j in jobs), *(redis_keys.job_claim(j, 1) for j in jobs))


def test_a_paused_consumer_takes_nothing_until_resumed(rig: Rig) -> None:
    """Paused (drain, quarantine, shutdown), it runs nothing: a message its pending pop brings in after the pause
    goes back to the queue unclaimed, for another worker, rather than being run or handed back as a new attempt."""
    consumer = rig.start()
    time.sleep(0.2)  # its first pop is waiting on the empty queue
    consumer.pause()
    job_id = str(uuid.uuid4())
    raw = rig.publish(job_id)  # the waiting pop takes it
    time.sleep(1.5)
    assert sync_redis().lrange(rig.queue, 0, -1) == [raw] and rig.outcomes(job_id) == []
    assert sync_redis().get(redis_keys.job_claim(job_id, 1)) is None
    consumer.resume()
    rig.wait_outcomes([job_id])
    assert rig.outcomes(job_id) == ["succeeded"]
    sync_redis().delete(redis_keys.job_stream(job_id), redis_keys.job_claim(job_id, 1))


def test_stop_waits_for_running_jobs_and_acks_them(rig: Rig) -> None:
    rig.engine.token_interval_s = 0.05
    job_id = str(uuid.uuid4())
    tag = message_decode(rig.publish(job_id, max_tokens=10))[1]
    consumer = rig.start()
    deadline = time.monotonic() + 5
    while not rig.runtime.running_jobs() and time.monotonic() < deadline:
        time.sleep(0.01)
    left = rig.runtime.host.run(consumer.stop(10.0))
    rig.consumer = None
    assert left == 0 and rig.outcomes(job_id) == ["succeeded"]
    assert unacked([tag]) == [None]
    later = str(uuid.uuid4())
    rig.publish(later)
    time.sleep(0.5)
    assert sync_redis().llen(rig.queue) == 1  # stopped for good
    sync_redis().delete(redis_keys.job_stream(job_id), redis_keys.job_claim(job_id, 1))


def test_a_message_popped_while_stopping_goes_back_to_its_queue(rig: Rig) -> None:
    """`stop` wakes the pop loop to end it; a message its pending pop brings in then is not run here."""
    rig.engine.token_interval_s = 0.05
    running = str(uuid.uuid4())
    rig.publish(running, max_tokens=30)  # keeps `stop` waiting a while
    consumer = rig.start()
    deadline = time.monotonic() + 5
    while not rig.runtime.running_jobs() and time.monotonic() < deadline:
        time.sleep(0.01)
    stopping = rig.runtime.host.submit(consumer.stop(10.0))
    while not consumer._stopping:  # the loop ran `stop` up to its first wait
        time.sleep(0.005)
    late = str(uuid.uuid4())
    raw = rig.publish(late)
    assert stopping.result(timeout=15) == 0
    rig.consumer = None
    assert rig.outcomes(running) == ["succeeded"] and rig.outcomes(late) == []
    assert sync_redis().lrange(rig.queue, 0, -1) == [raw]
    sync_redis().delete(redis_keys.job_stream(running), redis_keys.job_claim(running, 1))


def test_a_drain_hands_running_jobs_back(rig: Rig) -> None:
    """Shutdown: the drain aborts what outlives its grace and reports it for requeue; stop then acks it."""
    rig.engine.token_interval_s = 0.1
    job_id = str(uuid.uuid4())
    rig.publish(job_id, max_tokens=200)
    consumer = rig.start()
    deadline = time.monotonic() + 5
    while not rig.runtime.running_jobs() and time.monotonic() < deadline:
        time.sleep(0.01)
    consumer.pause()
    rig.runtime.drain(0.2)
    left = rig.runtime.host.run(consumer.stop(10.0))
    rig.consumer = None
    assert left == 0 and rig.outcomes(job_id) == ["requeue"]
    sync_redis().delete(redis_keys.job_stream(job_id), redis_keys.job_claim(job_id, 1))


def test_a_malformed_message_is_dropped_and_the_next_one_runs(rig: Rig) -> None:
    sync_redis().lpush(rig.queue, b"not json at all")
    sync_redis().lpush(rig.queue, task_message(task="farm.control.reap", queue=rig.queue, kwargs={}))
    job_id = str(uuid.uuid4())
    rig.publish(job_id)
    rig.start()
    rig.wait_outcomes([job_id])
    assert rig.outcomes(job_id) == ["succeeded"] and sync_redis().llen(rig.queue) == 0
    sync_redis().delete(redis_keys.job_stream(job_id), redis_keys.job_claim(job_id, 1))


def test_a_spec_not_loaded_yet_is_loaded_off_the_loop(rig: Rig) -> None:
    """A lazy spec: the first message loads it in a thread (a load blocks); the loop keeps serving meanwhile."""
    loads: list[str] = []

    def slow_load(config: EngineConfig) -> NullEngine:
        time.sleep(0.3)
        loads.append(config.spec_name)
        return rig.engine

    rig.runtime.engines = EnginePool(
        configs={SPEC: EngineConfig(spec_name=SPEC, model_path=Path("/nonexistent"))},
        need_bytes={},
        budget_bytes=0,
        load=slow_load,
        unload=lambda *_: None,
    )
    jobs = [str(uuid.uuid4()) for _ in range(3)]
    for job_id in jobs:
        rig.publish(job_id)
    rig.start()
    rig.wait_outcomes(jobs)
    assert [rig.outcomes(j) for j in jobs] == [["succeeded"]] * 3
    assert loads == [SPEC]
    sync_redis().delete(*(redis_keys.job_stream(j) for j in jobs), *(redis_keys.job_claim(j, 1) for j in jobs))


def test_job_log_lines_carry_the_request_id(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    job_id = str(uuid.uuid4())
    rig.publish(job_id)
    caplog.handler.addFilter(RequestIdFilter())  # as a worker's handlers have it (`logging_add_request_id`)
    with caplog.at_level("INFO", logger="gpu_workers.inference"):
        rig.start()
        rig.wait_outcomes([job_id])
        deadline = time.monotonic() + 2
        while not [r for r in caplog.records if job_id in r.getMessage()] and time.monotonic() < deadline:
            time.sleep(0.02)
    [line] = [r for r in caplog.records if job_id in r.getMessage()]
    assert "succeeded (3 prompt + 4 completion tokens)" in line.getMessage()
    assert line.request_id == "req-" + job_id[:8]
    sync_redis().delete(redis_keys.job_stream(job_id), redis_keys.job_claim(job_id, 1))


def test_decode_reads_what_the_api_publishes() -> None:
    raw = task_message(
        task=queues.INFER_TASK.name,
        queue="infer.x",
        kwargs={
            "job_id": "j1",
            "attempt": 2,
            "spec": "x",
            "kind": "completion",
            "request": {"prompt": "hi"},
            "deadline": 123.0,
            "stream_tokens": False,
        },
        request_id="r1",
    )
    message, tag, request_id = message_decode(raw)
    assert (message.job_id, message.attempt, message.kind, message.stream_tokens) == ("j1", 2, "completion", False)
    assert tag == orjson.loads(raw)["properties"]["delivery_tag"] and request_id == "r1"


def test_several_queues_take_turns(rig: Rig) -> None:
    """BLMPOP serves the first non-empty key it is given; the consumer rotates its keys so that one busy spec's
    queue cannot starve another's."""
    other = queues.infer_queue(f"test-{uuid.uuid4().hex[:12]}")
    rig.engine.token_interval_s = 0.02
    first = [str(uuid.uuid4()) for _ in range(6)]
    for job_id in first:
        rig.publish(job_id, max_tokens=5)
    second = str(uuid.uuid4())
    rig.queue, own = other, rig.queue
    rig.publish(second)
    rig.queue = own
    rig.start(concurrency=1, also=(other,))
    rig.wait_outcomes([*first, second])
    order = [e["job_id"] for e in rig.events if e["kind"] == "running"]
    assert order.index(second) <= 1  # served second at the latest, not after the six of the other queue
    sync_redis().delete(other)
    jobs = [*first, second]
    sync_redis().delete(*(redis_keys.job_stream(j) for j in jobs), *(redis_keys.job_claim(j, 1) for j in jobs))
