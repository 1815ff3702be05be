"""Operator commands reach a worker's runtime over Redis pub/sub (drain, quarantine, resume), the heartbeat's
tokens/s window, and the worker's own `/metrics` endpoint parsed with prometheus_client's parser."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from farm import redis_keys
from farm.celery_app import create_celery_app
from farm.errors import InvalidRequest, NotFound
from farm.worker_control import worker_drain, worker_quarantine, worker_resume
from gpu_workers.engine_host import EngineHost
from gpu_workers.heartbeat import Heartbeat
from gpu_workers.inference import Outcome
from gpu_workers.job_events import JobEventPublisher
from gpu_workers.metrics import start_metrics_server
from gpu_workers.runtime import TOKEN_RATE_WINDOW_S, LoadStats, WorkerRuntime
from settings import env
from tests.services import free_port

WORKER = "control-test-worker"


class Consuming:
    """Records the runtime's consume hooks (in a real worker they broadcast cancel/add_consumer to Celery)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def stop(self) -> None:
        self.calls.append("stop")

    def start(self) -> None:
        self.calls.append("start")


@pytest.fixture
def worker() -> Iterator[tuple[WorkerRuntime, Consuming, Heartbeat]]:
    """A worker runtime listening for control commands on the test Redis, advertised by a real heartbeat."""
    host = EngineHost(redis_url=env.REDIS_URL)
    app = create_celery_app(broker_url=env.REDIS_URL, main="farm-worker-test")
    runtime = WorkerRuntime(worker_id=WORKER, redis_url=env.REDIS_URL, host=host, events=JobEventPublisher(app, WORKER))
    consuming = Consuming()
    runtime.on_quarantine, runtime.on_resume = consuming.stop, consuming.start
    heartbeat = Heartbeat(
        client=redis.Redis.from_url(env.REDIS_URL),
        worker_id=WORKER,
        interval_s=0.2,
        ttl_s=5,
        describe=lambda: {"status": runtime.status, "specs": [], "load": runtime.stats.snapshot()},
    )
    heartbeat.start()
    client = redis.Redis.from_url(env.REDIS_URL)

    def subscribers() -> int:
        return client.pubsub_numsub(redis_keys.WORKER_CONTROL_CHANNEL)[0][1]

    others = subscribers()  # the suite's live farm has a worker listening on the same channel
    listener = host.submit(runtime.listen_for_control())
    deadline = time.monotonic() + 5
    while subscribers() <= others:  # this runtime's listener is subscribed
        assert time.monotonic() < deadline, "the control listener never subscribed"
        time.sleep(0.02)
    yield runtime, consuming, heartbeat
    listener.cancel()
    heartbeat.stop()
    runtime.redis.close()
    host.close()


def advertised_status(worker_id: str = WORKER, *, becomes: str, timeout: float = 10.0) -> str:
    """The status in the worker's registry entry, once it equals `becomes` (or whatever it is at the timeout)."""
    import orjson

    client = redis.Redis.from_url(env.REDIS_URL)
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        raw = client.get(redis_keys.worker(worker_id))
        status = orjson.loads(raw)["status"] if raw else None
        if status == becomes:
            break
        time.sleep(0.05)
    return status


def test_drain_quarantine_resume_reach_the_worker(worker) -> None:
    runtime, consuming, _ = worker
    assert worker_drain(worker_id=WORKER) >= 1
    assert advertised_status(becomes="draining") == "draining"
    assert consuming.calls == ["stop"]
    worker_quarantine(worker_id=WORKER)
    assert advertised_status(becomes="quarantined") == "quarantined"
    assert consuming.calls == ["stop"]  # already not consuming
    runtime.stats.consecutive_failures = 7
    worker_resume(worker_id=WORKER)
    assert advertised_status(becomes="ready") == "ready"
    assert consuming.calls == ["stop", "start"]
    assert runtime.stats.consecutive_failures == 0


def test_a_command_for_another_worker_is_ignored(worker) -> None:
    runtime, consuming, _ = worker
    other = Heartbeat(
        client=redis.Redis.from_url(env.REDIS_URL),
        worker_id="someone-else",
        interval_s=60,
        ttl_s=5,
        describe=lambda: {"status": "ready"},
    )
    other.beat()
    try:
        worker_drain(worker_id="someone-else")
        time.sleep(0.5)
        assert runtime.status == "ready"
        assert consuming.calls == []
    finally:
        other.stop()


def test_a_worker_shutting_down_is_not_resumed(worker) -> None:
    runtime, consuming, _ = worker
    runtime.drain(grace_s=0.1)  # SIGTERM
    worker_resume(worker_id=WORKER)
    time.sleep(0.5)
    assert runtime.status == "draining"
    assert "start" not in consuming.calls


def test_commands_need_a_live_worker_and_a_known_action() -> None:
    with pytest.raises(NotFound):
        worker_drain(worker_id="no-such-worker")
    from farm.worker_control import worker_control_send

    with pytest.raises(InvalidRequest):
        worker_control_send(worker_id="no-such-worker", action="reboot")


def test_tokens_per_second_over_the_window() -> None:
    stats = LoadStats()
    assert stats.snapshot(now=0.0)["tokens_per_s"] == 0.0
    for second in range(1, 11):
        stats.begin()
        stats.end(Outcome(status="succeeded", completion_tokens=50), worker_fault=False)
        snapshot = stats.snapshot(now=float(second))
    assert snapshot["tokens_per_s"] == pytest.approx(50.0)
    idle = stats.snapshot(now=10.0 + TOKEN_RATE_WINDOW_S + 5)  # nothing new for longer than the window
    assert idle["tokens_per_s"] < 50.0
    assert stats.snapshot(now=10.0 + 3 * TOKEN_RATE_WINDOW_S)["tokens_per_s"] == 0.0


def test_worker_metrics_endpoint() -> None:
    port = free_port()
    describe = lambda: {  # noqa: E731
        "status": "quarantined",
        "specs": ["s"],
        "hardware": {
            "kind": "gpu",
            "gpus": [
                {
                    "index": 0,
                    "name": "L4",
                    "memory_total_mib": 23034,
                    "memory_used_mib": 1000,
                    "memory_free_mib": 22034,
                    "utilization_pct": 10,
                    "temperature_c": 40,
                    "power_w": 30.0,
                }
            ],
        },
        "load": {"running": 1, "capacity": 4, "completed": 9, "failed": 2, "tokens": 777, "tokens_per_s": 3.5},
    }
    start_metrics_server(port=port, addr="127.0.0.1", worker_id="w-metrics", describe=describe)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("farm_worker_status", (("status", "quarantined"),))] == 1
    assert samples[("farm_worker_status", (("status", "ready"),))] == 0
    assert samples[("farm_worker_running_jobs", ())] == 1
    assert samples[("farm_worker_completion_tokens_total", ())] == 777
    assert samples[("farm_worker_jobs_failed_total", ())] == 2
    assert samples[("farm_worker_tokens_per_second", ())] == 3.5
    gpu = (("gpu", "0"), ("name", "L4"), ("worker", "w-metrics"))
    assert samples[("farm_gpu_memory_used_bytes", gpu)] == 1000 * 2**20
    assert samples[("farm_gpu_utilization_ratio", gpu)] == pytest.approx(0.1)
