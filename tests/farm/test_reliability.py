"""Fault injection on a live farm of its own: every accepted job reaches exactly one terminal state.

Real processes (API, control worker with beat, two vLLM workers on the tiny model), a Valkey of its own that keeps
nothing across a restart, and the test database, which the test reads with the ORM while the farm writes it.

The scenarios share the module's farm and run in file order, chosen so that as few workers as possible have to be
started again (a vLLM load costs 40-60 s on a small machine):

    [a, b]  duplicate delivery, deadline, cancels, Redis restart, SIGKILL with a survivor  -> [b]
    [b]     SIGKILL of the only worker, then new workers                                 -> [c, d]
    [c, d]  SIGTERM: the worker drains and hands its job back                            -> [d] (+ e loading)
    [d]     database outage behind a TCP proxy (PostgreSQL only)
    [d, e]  quarantine of a worker whose engine died

Each test asks for the workers it needs (`FaultFarm.ensure_workers`), so any one of them also runs on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson
import psutil
import pytest
import redis

from farm import queues, redis_keys
from tests.conftest import TINY_ENGINE_ARGS, database_url_for_children
from tests.live_farm import (
    FarmProcesses,
    PausedEngines,
    child_env,
    http_ok,
    registry_entries,
    start_worker,
    wait_for,
)
from tests.services import free_port

pytestmark = [pytest.mark.live, pytest.mark.timeout(600)]

FAULT_MODEL = "tiny-faults"
FAULT_SPEC = "tiny-faults-cpu"
LEASE_S = 6.0
GRACE_S = 0.5
SLOTS_PER_WORKER = 2
QUARANTINE_AFTER = 5  # the workers' default (FARM_QUARANTINE_AFTER)
# The tiny model's context is raised to its 2048 positions so that a job with `ignore_eos` lasts long enough (several
# seconds) for a fault to hit it mid-generation: 900 tokens took under 2 s on an idle 2-core machine.
FAULT_ENGINE_ARGS = {**TINY_ENGINE_ARGS, "max_model_len": 2048}
LONG = 1900
FAULT_ENV = {
    "FARM_JOB_LEASE_S": str(LEASE_S),
    "FARM_REAP_EVERY_S": "1",
    "FARM_SWEEP_AFTER_S": "5",
    "FARM_HEARTBEAT_S": "1",
    "FARM_WORKER_TTL_S": "4",
    "FARM_SHUTDOWN_GRACE_S": str(GRACE_S),
    "FARM_WORKER_CONCURRENCY": str(SLOTS_PER_WORKER),
    # Two or three workers share this machine with other test runs: a small KV cache is plenty for the tiny model.
    "FARM_CPU_KVCACHE_GIB": "1",
}
ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "canceled", "timed_out")
LOG_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3}) ")

# Figures printed at the end of the module (and asserted where the scenario says so).
TIMINGS: dict[str, float] = {}


def marker(scenario: str) -> str:
    """A unique user message: it finds the job row of an in-flight request."""
    return f"{scenario} {uuid.uuid4().hex[:12]}: count slowly."


@dataclass
class FaultFarm:
    processes: FarmProcesses
    base_url: str
    api_key: str
    other_api_key: str
    owner_ids: tuple[int, ...]
    redis_url: str
    redis_port: int
    redis_dir: Path
    valkey: subprocess.Popen
    db: Any  # pytest-django's django_db_blocker
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=16))
    started_workers: list[str] = field(default_factory=list)

    @cached_property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, socket_timeout=15)

    def generating(self, job_id: str) -> bool:
        """Whether the job's first text is in its Redis stream (which opens at intake with its attempt's start): a delta
        with text, since a token can decode to none yet (the detokenizer holds back a partial character) and a
        scenario that counts the streamed chunks needs one with content (a run once had one token out and no text). A
        Valkey that does not answer fails the scenario with what its process and log say (a CI run once saw it silent
        for 20 s)."""
        from farm import stream_format

        try:
            entries = self.redis.xrange(redis_keys.job_stream(job_id), count=32)
        except redis.RedisError as exc:
            raise AssertionError(f"Valkey did not answer XRANGE ({exc}): {self.valkey_state()}") from exc
        field = stream_format.FIELD.encode()
        events = (stream_format.decode(fields[field]) for _, fields in entries)
        return any(isinstance(event, stream_format.Delta) and event.text for event in events)

    def stream_ended(self, job_id: str) -> bool:
        """Whether the job's Redis stream holds its final event (its worker answered, whatever the row says yet)."""
        from farm import stream_format

        last = self.redis.xrevrange(redis_keys.job_stream(job_id), count=1)
        return bool(last) and isinstance(
            stream_format.decode(last[0][1][stream_format.FIELD.encode()]), stream_format.End | stream_format.Failure
        )

    def valkey_state(self) -> str:
        try:
            process = psutil.Process(self.valkey.pid)
            state = f"pid {process.pid} {process.status()}, cpu {process.cpu_times()}, rss {process.memory_info().rss}"
        except psutil.NoSuchProcess:
            state = f"exited with {self.valkey.poll()}"
        log_file = self.redis_dir / "redis.log"
        tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else "(no log)"
        return f"{state}; load {psutil.getloadavg()}; log tail:\n{tail}"

    # --- HTTP ---------------------------------------------------------------------------------------------------

    def headers(self, api_key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key or self.api_key}"}

    def chat_body(self, content: str, *, max_tokens: int, **extra: Any) -> dict[str, Any]:
        return {
            "model": FAULT_MODEL,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
            **extra,
        }

    def chat(
        self, content: str, *, max_tokens: int, http_timeout: float = 300, base_url: str | None = None, **extra: Any
    ) -> httpx.Response:
        return httpx.post(
            f"{base_url or self.base_url}/v1/chat/completions",
            headers=self.headers(),
            json=self.chat_body(content, max_tokens=max_tokens, **extra),
            timeout=http_timeout,
        )

    def submit(self, content: str, **kwargs: Any) -> Future[httpx.Response]:
        """A non-streaming request on a background thread."""
        return self.pool.submit(self.chat, content, **kwargs)

    def cancel(self, job_id: str, *, api_key: str | None = None) -> httpx.Response:
        return httpx.post(f"{self.base_url}/v1/jobs/{job_id}/cancel", headers=self.headers(api_key), timeout=30)

    # --- workers ------------------------------------------------------------------------------------------------

    def registry(self) -> dict[str, dict]:
        return registry_entries(self.redis)

    def worker_names(self) -> list[str]:
        """Worker processes this farm runs (loading or serving)."""
        return [name for name in self.processes.children if name.startswith("worker-")]

    def serving(self) -> list[str]:
        """Running workers that serve the spec and consume its queue.

        A worker's heartbeat says `ready` once its engine is loaded, a few seconds before its Celery consumer takes
        messages: scenarios that count busy slots need the consumer."""
        entries = self.registry()
        return [
            name
            for name in self.worker_names()
            if entries.get(name, {}).get("status") == "ready"
            and FAULT_SPEC in entries[name].get("specs", ())
            and any(f"{name}@" in line and line.endswith(" ready.") for line in self.log_lines(name))
        ]

    def start_workers(self, count: int) -> list[str]:
        names = []
        for _ in range(count):
            name = f"worker-{chr(ord('a') + len(self.started_workers))}"
            start_worker(self.processes, name=name, spec=FAULT_SPEC, concurrency=SLOTS_PER_WORKER)
            self.started_workers.append(name)
            names.append(name)
        return names

    def wait_serving(self, names: list[str], timeout: float = 300) -> None:
        wait_for(
            lambda: set(names) <= set(self.serving()),
            timeout=timeout,
            farm=self.processes,
            what=f"workers {names} to serve {FAULT_SPEC}",
        )

    def ensure_workers(self, *, at_least: int, at_most: int | None = None) -> list[str]:
        """Starts workers (or stops spare ones) until `at_least`..`at_most` serve; returns those that serve."""
        for name in self.worker_names():  # quarantined ones are of no use to the next scenario
            if self.registry().get(name, {}).get("status") == "quarantined":
                self.processes.stop(name)
        missing = at_least - len(self.worker_names())
        if missing > 0:
            self.start_workers(missing)
        self.wait_serving(self.worker_names())
        spare = self.serving()[at_most:] if at_most is not None else []
        for name in spare:
            self.processes.stop(name)
        wait_for(lambda: not set(spare) & set(self.registry()), timeout=30, what=f"{spare} to leave the registry")
        return self.serving()

    def log_lines(self, name: str) -> list[str]:
        path = self.processes.log_path(name)
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    def log_line(self, text: str, *, timeout: float = 15) -> tuple[str, str]:
        """(worker, first line) of any worker log that contains `text`, waiting for it."""
        found: list[tuple[str, str]] = []

        def search() -> bool:
            for name in self.started_workers:
                found.extend((name, line) for line in self.log_lines(name) if text in line)
            return bool(found)

        wait_for(search, timeout=timeout, what=f"{text!r} in a worker log")
        return found[0]

    def engines_paused(self, names: list[str] | None = None) -> contextlib.AbstractContextManager[PausedEngines]:
        """`FarmProcesses.engines_paused` for the named workers (default: all of this farm's)."""
        return self.processes.engines_paused(self.worker_names() if names is None else names)

    # --- Redis --------------------------------------------------------------------------------------------------

    def restart_redis(self) -> float:
        """Stops Valkey (it keeps nothing) and starts a fresh one on the same port; returns the downtime in s."""
        from farm.embedded_redis import start_embedded_redis

        stopped_at = time.monotonic()
        self.valkey.terminate()
        self.valkey.wait(timeout=30)
        self.valkey = start_embedded_redis(
            port=self.redis_port, data_dir=self.redis_dir, log_file=self.redis_dir / "redis.log", persistent=False
        )
        return time.monotonic() - stopped_at

    # --- database -----------------------------------------------------------------------------------------------

    def _jobs(self):  # a QuerySet of this farm's jobs (Django is imported late)
        from farm.models import Job

        return Job.objects.select_related("spec").filter(owner_id__in=self.owner_ids, model__name=FAULT_MODEL)

    def job_of(self, content: str, *, timeout: float = 30) -> Any:
        """The job row created for the request whose user message is `content` (waits for it to be committed)."""
        return self.wait_job(content, lambda job: True, timeout=timeout, what="its job row")

    def wait_job(self, content: str, predicate: Callable[[Any], bool], *, timeout: float, what: str) -> Any:
        found: list[Any] = []

        def check() -> bool:
            with self.db.unblock():
                job = self._jobs().filter(request__messages__0__content=content).first()
            if job is not None and predicate(job):
                found.append(job)
                return True
            return False

        wait_for(check, timeout=timeout, farm=self.processes, what=f"{content[:24]}...: {what}")
        return found[0]

    def job(self, job_id: str) -> Any:
        with self.db.unblock():
            return self._jobs().get(pk=job_id)

    def events(self, job_id: str) -> list[Any]:
        from farm.models import JobEvent

        with self.db.unblock():
            return list(JobEvent.objects.filter(job_id=job_id).order_by("at", "id"))

    def wait_canceled_usage(self, job_id: str, *, timeout: float = 15) -> tuple[list[Any], Any]:
        """The events and row of a canceled job once its worker's usage report (tokens used before the abort) was
        applied."""
        wait_for(
            lambda: any(event.kind == "usage" for event in self.events(job_id)),
            timeout=timeout,
            what=f"the usage report of canceled job {job_id}",
        )
        return self.events(job_id), self.job(job_id)

    def wait_terminal(self, job_ids: list[str], *, timeout: float) -> dict[str, Any]:
        rows: dict[str, Any] = {}

        def check() -> bool:
            with self.db.unblock():
                rows.update({str(job.pk): job for job in self._jobs().filter(pk__in=job_ids)})
            return len(rows) == len(job_ids) and all(job.status in TERMINAL for job in rows.values())

        try:
            wait_for(check, timeout=timeout, farm=self.processes, what=f"{len(job_ids)} job(s) to end")
        except TimeoutError:
            stuck = {
                job_id: (job.status, job.attempt, job.worker_id)
                for job_id, job in rows.items()
                if job.status not in TERMINAL
            }
            raise AssertionError(f"jobs still active after {timeout}s: {stuck}") from None
        return rows

    def active_jobs(self) -> list[tuple[str, str, int]]:
        with self.db.unblock():
            return list(self._jobs().filter(status__in=ACTIVE).values_list("pk", "status", "attempt"))

    def wait_idle(self, timeout: float = 60) -> None:
        """Nothing of this farm queued or running (what a scenario leaves behind must have ended)."""
        try:
            wait_for(lambda: not self.active_jobs(), timeout=timeout, what="the farm's jobs to end")
        except TimeoutError:
            raise AssertionError(f"jobs left active: {self.active_jobs()}") from None


@pytest.fixture(scope="module")
def fault_farm(django_db_setup, django_db_blocker, tiny_model_dir: Path, tmp_path_factory) -> Iterator[FaultFarm]:
    """A farm of its own (own Valkey without persistence, own model and spec, own users) on the test database."""
    from django.contrib.auth import get_user_model

    from farm import processes
    from farm.api_keys import api_key_create
    from farm.catalog import catalog_load
    from farm.embedded_redis import start_embedded_redis
    from farm.models import Model, Worker

    home = tmp_path_factory.mktemp("fault-farm")
    (home / "logs").mkdir()
    redis_port = free_port()
    valkey = start_embedded_redis(
        port=redis_port, data_dir=home / "redis", log_file=home / "redis" / "redis.log", persistent=False
    )
    suffix = uuid.uuid4().hex[:8]
    with django_db_blocker.unblock():
        catalog_load(
            {
                "models": [
                    {
                        "name": FAULT_MODEL,
                        "source": str(tiny_model_dir),
                        "engine_args": FAULT_ENGINE_ARGS,
                        "specs": [{"name": FAULT_SPEC, "engine": "vllm-cpu"}],
                    }
                ]
            }
        )
        users = get_user_model().objects
        owner, other = users.create(username=f"faults-{suffix}"), users.create(username=f"faults-other-{suffix}")
        _, api_key = api_key_create(owner=owner, name="faults")
        _, other_api_key = api_key_create(owner=other, name="faults")
        database_url = database_url_for_children()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env = {**child_env(database_url=database_url, model_dir=tiny_model_dir.parent), **FAULT_ENV, "REDIS_URL": redis_url}
    farm_processes = FarmProcesses(env=env, log_dir=home / "logs")
    api_port = free_port()
    farm = FaultFarm(
        processes=farm_processes,
        base_url=f"http://127.0.0.1:{api_port}",
        api_key=api_key,
        other_api_key=other_api_key,
        owner_ids=(owner.pk, other.pk),
        redis_url=redis_url,
        redis_port=redis_port,
        redis_dir=home / "redis",
        valkey=valkey,
        db=django_db_blocker,
    )
    started = time.monotonic()
    try:
        farm_processes.start("control", processes.control_worker_command(beat_schedule=str(home / "beat-schedule")))
        farm_processes.start("api", processes.api_command(host="127.0.0.1", port=api_port))
        farm.start_workers(2)
        wait_for(lambda: http_ok(f"{farm.base_url}/readyz"), timeout=60, farm=farm_processes, what="the API")
        farm.wait_serving(["worker-a", "worker-b"])
        TIMINGS["farm start (2 workers), s"] = time.monotonic() - started
        yield farm
    finally:
        farm.pool.shutdown(wait=False, cancel_futures=True)
        farm_processes.stop_all()
        farm.valkey.terminate()
        farm.valkey.wait(timeout=30)
        with django_db_blocker.unblock():
            users.filter(pk__in=(owner.pk, other.pk)).delete()  # their keys and jobs (and job events) go too
            Model.objects.filter(name=FAULT_MODEL).delete()
            Worker.objects.filter(worker_id__in=farm.started_workers).delete()
        print(f"\nfault farm logs: {home / 'logs'}")
        for name, value in TIMINGS.items():
            print(f"  {name}: {value:.2f}")


# --- helpers for assertions --------------------------------------------------------------------------------------


def kinds(events: list[Any]) -> list[tuple[str, int]]:
    return [(event.kind, event.attempt) for event in events]


def assert_one_terminal_event(events: list[Any], status: str) -> None:
    terminal = [event.kind for event in events if event.kind in TERMINAL]
    assert terminal == [status], kinds(events)


def assert_openai_error(response: httpx.Response, status: int, *, code: str, type: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = orjson.loads(response.content)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == code and error["message"], error
    if type is not None:
        assert error["type"] == type, error
    return error


def assert_full_completion(response: httpx.Response, max_tokens: int) -> dict:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["completion_tokens"] == max_tokens, body["usage"]
    assert body["choices"][0]["finish_reason"] == "length"
    return body


def log_time(line: str) -> float:
    stamp = LOG_TIME.match(line)
    assert stamp, line
    return datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()  # local time, like the logs


class StreamReader:
    """A streaming chat request on a thread: records its SSE payloads; `first_chunk` is set at the first delta."""

    def __init__(self, farm: FaultFarm, content: str, *, max_tokens: int, close_after_first: bool = False) -> None:
        self.payloads: list[Any] = []
        self.status: int | None = None
        self.first_chunk = threading.Event()
        # With `close_after_first`, the reader holds the connection open after its first delta until this is set.
        self.close_now = threading.Event()
        self._farm, self._content, self._max_tokens = farm, content, max_tokens
        self._close_after_first = close_after_first
        self.done = farm.pool.submit(self._read)

    def _read(self) -> None:
        body = self._farm.chat_body(self._content, max_tokens=self._max_tokens, stream=True)
        with (
            httpx.Client(timeout=120) as client,
            client.stream(
                "POST",
                f"{self._farm.base_url}/v1/chat/completions",
                headers=self._farm.headers(),
                json=body,
            ) as response,
        ):
            self.status = response.status_code
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                self.payloads.append(data if data == "[DONE]" else orjson.loads(data))
                if isinstance(self.payloads[-1], dict) and self.payloads[-1].get("choices"):
                    self.first_chunk.set()
                    if self._close_after_first:
                        self.close_now.wait(timeout=120)
                        return  # leaving the block closes the connection: the client went away
        self.first_chunk.set()

    @property
    def job_id(self) -> str:
        return next(p["id"] for p in self.payloads if isinstance(p, dict) and "id" in p).removeprefix("chatcmpl-")


def stream_in_flight(
    fault_farm: FaultFarm, engines: PausedEngines, scenario: str, *, close_after_first: bool = False
) -> tuple[StreamReader, str]:
    """A streamed LONG request whose job is `running` with its first tokens out, the engines (paused before the
    request by the caller) paused again. Two CI runs saw such a job run to its end although the engines were paused
    and stepped, on a worker started a second before: the engine had made the tokens in its steps, and the worker,
    slow on its first requests, forwarded them after the pause (vLLM's engine-to-client queue has no bound). The
    scenario needs a job in flight, so a job that ended anyway is replaced by a new request, 3 tries at most."""
    ended: list[str] = []
    for _ in range(3):
        content = marker(scenario)
        stream = StreamReader(fault_farm, content, max_tokens=LONG, close_after_first=close_after_first)
        job_id = str(fault_farm.job_of(content).pk)
        fault_farm.wait_job(content, lambda job: job.status != "queued", timeout=30, what="running")
        engines.run_until(
            lambda: fault_farm.generating(job_id),  # noqa: B023 (called at once)
            timeout=60,
            what="the first tokens",
        )
        time.sleep(0.5)  # paused: nothing may move now; an ended job's events land meanwhile
        if fault_farm.job(job_id).status == "running" and not fault_farm.stream_ended(job_id):
            return stream, job_id
        ended.append(f"{job_id}: {fault_farm.job(job_id).status}")
        print(f"\n{scenario}: job {job_id} ended before the engines were paused again; trying a new request")
        stream.close_now.set()
        stream.done.result(timeout=60)
    raise AssertionError(f"no job stayed in flight with the engines paused: {ended}")


# --- scenarios, in file order ------------------------------------------------------------------------------------


def test_duplicate_delivery_runs_the_job_once(fault_farm: FaultFarm) -> None:
    """The broker delivers a job's message twice: one worker claims the attempt, the other ignores its copy."""
    from farm.celery_app import create_celery_app

    fault_farm.ensure_workers(at_least=2)
    content = marker("duplicate")
    response = fault_farm.submit(content, max_tokens=200)
    job = fault_farm.job_of(content)

    app = create_celery_app(broker_url=fault_farm.redis_url, main="fault-test")
    try:
        app.send_task(
            queues.INFER_TASK.name,
            queue=queues.infer_queue(job.spec.name),
            kwargs={
                "job_id": str(job.pk),
                "attempt": job.attempt,
                "spec": job.spec.name,
                "kind": job.kind,
                "request": job.request,
                "deadline": job.deadline_at.timestamp(),
            },
        )
    finally:
        app.close()

    assert_full_completion(response.result(timeout=120), 200)
    worker, _ = fault_farm.log_line(f"job {job.pk} attempt 1 already claimed: duplicate delivery ignored")
    job = fault_farm.wait_terminal([str(job.pk)], timeout=30)[str(job.pk)]
    assert (job.status, job.attempt) == ("succeeded", 1)
    assert job.usage["completion_tokens"] == 200
    events = fault_farm.events(str(job.pk))
    assert kinds(events) == [("running", 1), ("succeeded", 1)]
    assert events[0].worker_id == events[1].worker_id == job.worker_id
    print(f"\nduplicate: ran on {job.worker_id}, the copy was ignored by {worker}")
    fault_farm.wait_idle()


def test_deadline_is_a_504_and_the_job_times_out(fault_farm: FaultFarm) -> None:
    fault_farm.ensure_workers(at_least=1)
    content = marker("deadline")
    with fault_farm.engines_paused():  # a fast machine could otherwise finish the job inside its deadline
        started = time.monotonic()
        response = fault_farm.chat(content, max_tokens=LONG, timeout=1.5)
        elapsed = time.monotonic() - started

    assert_openai_error(response, 504, code="deadline_exceeded", type="timeout_error")
    assert elapsed < 1.5 + 5, elapsed  # the worker stops at the deadline; the API gives up 2 s after it at most
    job_id = str(fault_farm.job_of(content).pk)
    job = fault_farm.wait_terminal([job_id], timeout=30)[job_id]
    assert (job.status, job.attempt) == ("timed_out", 1)
    assert job.error["code"] == "deadline_exceeded"
    assert_one_terminal_event(fault_farm.events(job_id), "timed_out")
    TIMINGS["deadline 1.5 s: answered after, s"] = elapsed
    fault_farm.wait_idle()


def test_cancel_a_running_streamed_job(fault_farm: FaultFarm) -> None:
    """A cancel aborts the engine request within a second; the stream ends with an error then [DONE]; a second
    cancel is a no-op; another key cannot see or cancel the job."""
    fault_farm.ensure_workers(at_least=1)
    # The engines are paused before the request: the job is taken and `running`, then they run just long enough
    # for its first tokens, so the request stays in flight however fast or slow this machine is right now.
    with fault_farm.engines_paused() as engines:
        stream, job_id = stream_in_flight(fault_farm, engines, "cancel-running")
        foreign = fault_farm.cancel(job_id, api_key=fault_farm.other_api_key)
        assert_openai_error(foreign, 404, code="job_not_found", type="not_found_error")
        assert fault_farm.job(job_id).status == "running"

        announced: list[float] = []  # when the cancel was published: splits the API's share from the worker's
        listener = fault_farm.redis.pubsub()
        listener.subscribe(**{redis_keys.CANCEL_CHANNEL: lambda message: announced.append(time.time())})
        listening = listener.run_in_thread(sleep_time=0.005, daemon=True)
        try:
            canceled_at = time.time()
            response = fault_farm.cancel(job_id)
            answered_at = time.time()
            assert response.status_code == 200, response.text
            assert (response.json()["id"], response.json()["status"]) == (job_id, "canceled")
            worker, line = fault_farm.log_line(f"job {job_id} canceled: engine request aborted", timeout=10)
            wait_for(lambda: bool(announced), timeout=5, what="the cancel announcement")
        finally:
            listening.stop()
    cancel_to_abort = log_time(line) - canceled_at
    TIMINGS["cancel -> engine abort (worker log), s"] = cancel_to_abort
    TIMINGS["cancel -> announced on pub/sub, s"] = announced[0] - canceled_at
    TIMINGS["cancel -> API answered, s"] = answered_at - canceled_at
    assert -0.01 <= cancel_to_abort <= 1.0, line

    stream.done.result(timeout=30)
    assert stream.status == 200
    assert stream.payloads[-1] == "[DONE]"
    assert stream.payloads[-2]["error"]["code"] == "canceled", stream.payloads[-2]
    assert all("choices" in p for p in stream.payloads[:-2])

    again = fault_farm.cancel(job_id)
    assert again.status_code == 200, again.text
    assert again.json()["status"] == "canceled"

    job = fault_farm.wait_terminal([job_id], timeout=10)[job_id]
    assert (job.status, job.attempt, job.worker_id) == ("canceled", 1, worker)
    events, job = fault_farm.wait_canceled_usage(job_id)
    # A cancel is not tied to an attempt; the worker then reports what the aborted attempt used.
    assert kinds(events) == [("running", 1), ("canceled", 0), ("usage", 1)]
    assert events[1].worker_id == "api"
    streamed = sum(len(p["choices"][0]["delta"].get("content") or "") > 0 for p in stream.payloads[:-2])
    assert job.usage["completion_tokens"] >= streamed >= 1, (job.usage, streamed)
    fault_farm.wait_idle()


def test_cancel_a_finished_job_is_409_and_another_keys_job_404(fault_farm: FaultFarm) -> None:
    fault_farm.ensure_workers(at_least=1)
    content = marker("cancel-finished")
    assert_full_completion(fault_farm.chat(content, max_tokens=5), 5)
    job_id = str(fault_farm.job_of(content).pk)

    assert_openai_error(fault_farm.cancel(job_id), 409, code="job_already_finished", type="conflict_error")
    assert_openai_error(fault_farm.cancel(job_id, api_key=fault_farm.other_api_key), 404, code="job_not_found")
    foreign_get = httpx.get(
        f"{fault_farm.base_url}/v1/jobs/{job_id}", headers=fault_farm.headers(fault_farm.other_api_key), timeout=30
    )
    assert_openai_error(foreign_get, 404, code="job_not_found")
    assert_openai_error(fault_farm.cancel(str(uuid.uuid4())), 404, code="job_not_found")

    job = fault_farm.wait_terminal([job_id], timeout=30)[job_id]  # its outcome event may still be on its way
    assert (job.status, job.attempt) == ("succeeded", 1)
    assert kinds(fault_farm.events(job_id)) == [("running", 1), ("succeeded", 1)]


def test_cancel_a_queued_job_never_runs_it(fault_farm: FaultFarm) -> None:
    serving = fault_farm.ensure_workers(at_least=2)
    slots = SLOTS_PER_WORKER * len(serving)
    busy = [marker(f"fill-{i}") for i in range(slots)]
    content = marker("cancel-queued")
    # Engines paused before the requests: the jobs that fill every slot stay `running` and cannot finish.
    with fault_farm.engines_paused():
        busy_responses = [fault_farm.submit(c, max_tokens=LONG) for c in busy]
        busy_ids = [
            str(fault_farm.wait_job(c, lambda j: j.status == "running", timeout=60, what="running").pk) for c in busy
        ]
        queued_response = fault_farm.submit(content, max_tokens=LONG)
        job_id = str(fault_farm.job_of(content).pk)
        time.sleep(0.5)  # every slot is busy: nobody takes it
        assert {fault_farm.job(busy_id).status for busy_id in busy_ids} == {"running"}
        assert fault_farm.job(job_id).status == "queued"
        assert fault_farm.redis.llen(queues.infer_queue(FAULT_SPEC)) >= 1
        assert fault_farm.redis.get(redis_keys.job_claim(job_id, 1)) is None

        response = fault_farm.cancel(job_id)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "canceled"
        assert_openai_error(queued_response.result(timeout=30), 409, code="canceled")

        for busy_id in busy_ids:  # free the slots: a worker now takes the canceled job's message and drops it
            assert fault_farm.cancel(busy_id).status_code == 200
    taken_by = fault_farm.log_line(f"job {job_id} was canceled before it started", timeout=30)[0]
    assert fault_farm.redis.get(redis_keys.job_claim(job_id, 1)) == taken_by.encode()

    rows = fault_farm.wait_terminal([job_id, *busy_ids], timeout=30)
    assert (rows[job_id].status, rows[job_id].attempt, rows[job_id].started_at) == ("canceled", 1, None)
    assert kinds(fault_farm.events(job_id)) == [("canceled", 0)]  # never `running`
    for busy_id in busy_ids:
        assert rows[busy_id].status == "canceled"
        # A usage report follows when the attempt had reached its engine before the cancel (paused, it made none)
        assert kinds(fault_farm.events(busy_id))[:2] == [("running", 1), ("canceled", 0)]
    for busy_response in busy_responses:
        assert_openai_error(busy_response.result(timeout=30), 409, code="canceled")
    fault_farm.wait_idle()


def test_a_client_that_disconnects_cancels_its_job(fault_farm: FaultFarm) -> None:
    fault_farm.ensure_workers(at_least=1)
    with fault_farm.engines_paused() as engines:  # as in the cancel scenario: the job cannot end on its own
        stream, job_id = stream_in_flight(fault_farm, engines, "disconnect", close_after_first=True)
        assert stream.first_chunk.wait(timeout=60)
        stream.close_now.set()
        stream.done.result(timeout=30)
        gone_at = time.monotonic()
        job = fault_farm.wait_terminal([job_id], timeout=10)[job_id]
        TIMINGS["client disconnect -> job canceled, s"] = time.monotonic() - gone_at
    assert (job.status, job.attempt) == ("canceled", 1)
    events, job = fault_farm.wait_canceled_usage(job_id)
    assert kinds(events) == [("running", 1), ("canceled", 0), ("usage", 1)]
    assert events[1].worker_id == "client disconnect"
    assert job.usage["completion_tokens"] >= 1  # the client read its first chunk: it used tokens
    fault_farm.wait_idle()


def test_redis_restart_without_persistence_loses_no_job(fault_farm: FaultFarm) -> None:
    """Valkey restarts empty (queues, claims, streams, registry gone) with jobs running and queued: every job
    still ends, once; the lost messages are published again by the sweeper."""
    serving = fault_farm.ensure_workers(at_least=2)
    slots = SLOTS_PER_WORKER * len(serving)
    max_tokens = LONG
    running = [marker(f"redis-running-{i}") for i in range(slots)]
    queued = [marker(f"redis-queued-{i}") for i in range(2)]
    responses = {c: fault_farm.submit(c, max_tokens=max_tokens) for c in running}
    # Started (the tiny model may already have finished one of them: the restart then finds it ended, as it may)
    running_ids = [
        str(fault_farm.wait_job(c, lambda j: j.status != "queued", timeout=60, what="started").pk) for c in running
    ]
    responses |= {c: fault_farm.submit(c, max_tokens=max_tokens) for c in queued}
    queued_ids = [str(fault_farm.job_of(c).pk) for c in queued]
    before = [fault_farm.job(job_id).status for job_id in running_ids + queued_ids]
    assert set(before) & {"queued", "running"}, before

    downtime = fault_farm.restart_redis()
    restarted = time.monotonic()
    TIMINGS["Redis restart downtime, s"] = downtime

    job_ids = running_ids + queued_ids
    rows = fault_farm.wait_terminal(job_ids, timeout=90)
    TIMINGS["Redis restart -> all jobs ended, s"] = time.monotonic() - restarted
    statuses = {c: responses[c].result(timeout=120).status_code for c in running + queued}
    print(
        f"\nredis restart: before {before}; after {[(rows[j].status, rows[j].attempt) for j in job_ids]}; "
        f"clients {sorted(statuses.values())}"
    )
    for job_id in job_ids:
        job = rows[job_id]
        assert job.status == "succeeded", (job_id, job.status, job.error, kinds(fault_farm.events(job_id)))
        assert_one_terminal_event(fault_farm.events(job_id), "succeeded")
        assert job.usage["completion_tokens"] == max_tokens
    for content in running + queued:
        response = responses[content].result()
        assert response.status_code in (200, 503, 504), response.text
        if response.status_code == 200:
            assert_full_completion(response, max_tokens)
        else:
            assert_openai_error(response, response.status_code, code=response.json()["error"]["code"])
    fault_farm.wait_idle()


def test_sigkill_of_a_busy_worker_while_another_is_alive(fault_farm: FaultFarm) -> None:
    fault_farm.ensure_workers(at_least=2)
    content = marker("sigkill")
    # Paused engines: the job is `running` when its worker dies, however fast the tiny model would have been. The
    # survivor's engine runs again when the block ends (the victim's is killed with it).
    with fault_farm.engines_paused():
        response = fault_farm.submit(content, max_tokens=LONG)
        job = fault_farm.wait_job(content, lambda j: j.status == "running", timeout=60, what="running")
        victim, job_id = job.worker_id, str(job.pk)
        killed_at = fault_farm.processes.kill(victim)

    job = fault_farm.wait_terminal([job_id], timeout=240)[job_id]
    assert (job.status, job.attempt) == ("succeeded", 2)
    assert job.worker_id != victim
    events = fault_farm.events(job_id)
    assert kinds(events) == [("running", 1), ("requeued", 1), ("running", 2), ("succeeded", 2)]
    assert (events[0].worker_id, events[1].worker_id) == (victim, "reaper")
    detection = events[1].at.timestamp() - killed_at
    TIMINGS["SIGKILL -> requeued (dead-worker detection), s"] = detection
    print(f"\nsigkill: {victim} killed; requeued {detection:.2f}s later (lease {LEASE_S}s), done on {job.worker_id}")
    assert detection <= 2 * LEASE_S
    assert_full_completion(response.result(timeout=60), LONG)
    fault_farm.wait_idle()


def test_sigkill_of_the_only_worker_then_a_new_worker_finishes_the_job(fault_farm: FaultFarm) -> None:
    (victim,) = fault_farm.ensure_workers(at_least=1, at_most=1)
    content = marker("sigkill-only")
    with fault_farm.engines_paused([victim]):  # `running` when it dies, however fast the tiny model is
        response = fault_farm.submit(content, max_tokens=LONG)
        job = fault_farm.wait_job(content, lambda j: j.status == "running", timeout=60, what="running")
        job_id = str(job.pk)
        assert job.worker_id == victim
        killed_at = time.monotonic()
        fault_farm.processes.kill(victim)
    # The replacement, and a second worker for the next scenario (they load side by side).
    replacements = fault_farm.start_workers(2)

    job = fault_farm.wait_terminal([job_id], timeout=400)[job_id]
    TIMINGS["only worker killed -> job done on a new worker, s"] = time.monotonic() - killed_at
    assert (job.status, job.attempt) == ("succeeded", 2)
    assert job.worker_id in replacements
    assert kinds(fault_farm.events(job_id)) == [("running", 1), ("requeued", 1), ("running", 2), ("succeeded", 2)]
    # The client waited all along (a minute or more without a token: the new worker was loading vLLM).
    assert_full_completion(response.result(timeout=60), LONG)
    fault_farm.wait_idle()


def test_sigterm_drains_and_hands_the_job_back(fault_farm: FaultFarm) -> None:
    fault_farm.ensure_workers(at_least=2)
    content = marker("sigterm")
    with fault_farm.engines_paused():  # seen `running` before it can end; it runs again for the signal
        response = fault_farm.submit(content, max_tokens=LONG)
        job = fault_farm.wait_job(content, lambda j: j.status == "running", timeout=60, what="running")
    victim, job_id = job.worker_id, str(job.pk)
    signaled_at = time.time()
    # The hand-back comes after the grace period; the exit after vLLM's own shutdown (up to 5 s for its worker
    # process, then as much for its engine core) and at most FARM_EXIT_TIMEOUT_S of the interpreter's teardown.
    returncode = fault_farm.processes.signal_and_wait(victim, signal.SIGTERM, timeout=GRACE_S + 30)
    TIMINGS["SIGTERM -> worker exit, s"] = time.time() - signaled_at
    assert returncode == 0, fault_farm.log_lines(victim)[-30:]

    job = fault_farm.wait_terminal([job_id], timeout=240)[job_id]
    events = fault_farm.events(job_id)
    assert job.status == "succeeded"
    if job.attempt == 1:  # it finished within the grace period
        assert kinds(events) == [("running", 1), ("succeeded", 1)]
        assert job.worker_id == victim
    else:
        assert kinds(events) == [("running", 1), ("requeued", 1), ("running", 2), ("succeeded", 2)]
        assert events[1].worker_id == victim and events[1].detail["reason"] == "worker shutting down"
        assert job.worker_id != victim
        TIMINGS["SIGTERM -> job handed back (requeued), s"] = events[1].at.timestamp() - signaled_at
        assert events[1].at.timestamp() - signaled_at <= GRACE_S + 5
    assert_full_completion(response.result(timeout=60), LONG)
    print(
        f"\nsigterm: {victim} exited {TIMINGS['SIGTERM -> worker exit, s']:.1f}s after SIGTERM; "
        f"job ended on attempt {job.attempt} ({job.worker_id})"
    )
    assert victim not in fault_farm.registry()  # it left the registry on its way out
    fault_farm.wait_idle()
    fault_farm.start_workers(1)  # loads while the next scenario runs: the quarantine one needs two


class TcpProxy:
    """Forwards 127.0.0.1:`port` to a backend; `cut()` drops every connection and refuses new ones until
    `restore()` (a network partition between an API process and its database)."""

    def __init__(self, backend_host: str, backend_port: int) -> None:
        self.backend = (backend_host, backend_port)
        self.port = free_port()
        self._open = True
        self._connections: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True).start()
        self._call(self._start())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._open:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.backend)
        except OSError:
            writer.transport.abort()
            return
        self._connections |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.transport.abort()
            self._connections.discard(sink)

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def _cut(self) -> None:
        self._open = False
        for writer in list(self._connections):
            writer.transport.abort()
        self._connections.clear()

    def cut(self) -> None:
        self._call(self._cut())

    def restore(self) -> None:
        self._open = True

    def close(self) -> None:
        self._call(self._cut())
        if self._server is not None:
            self._server.close()
        self._loop.call_soon_threadsafe(self._loop.stop)


def test_database_outage_is_a_503_and_recovers(fault_farm: FaultFarm) -> None:
    """A second API process reaches PostgreSQL through a proxy; cutting it answers 503 (not 500), restoring it
    serves again."""
    from farm import processes

    database_url = database_url_for_children()
    if not database_url.startswith("postgres"):
        pytest.skip("needs PostgreSQL (DATABASE_URL): SQLite is a file, there is no connection to cut")
    fault_farm.ensure_workers(at_least=1)
    parts = urlsplit(database_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    auth = parts.netloc.rpartition("@")[0]
    proxied_url = urlunsplit(parts._replace(netloc=f"{auth}@127.0.0.1:{proxy.port}"))
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    fault_farm.processes.start(
        "api-proxied", processes.api_command(host="127.0.0.1", port=port), DATABASE_URL=proxied_url
    )
    try:
        wait_for(lambda: http_ok(f"{base_url}/readyz"), timeout=60, farm=fault_farm.processes, what="the 2nd API")
        assert_full_completion(fault_farm.chat(marker("db-before"), max_tokens=5, base_url=base_url), 5)

        proxy.cut()
        cut_contents = [marker(f"db-cut-{i}") for i in range(3)]
        for content in cut_contents:
            response = fault_farm.chat(content, max_tokens=5, base_url=base_url, http_timeout=60)
            assert_openai_error(response, 503, code="database_unavailable", type="service_unavailable")
            assert response.headers.get("retry-after") == "5"
        jobs = httpx.get(f"{base_url}/v1/jobs", headers=fault_farm.headers(), timeout=60)
        assert_openai_error(jobs, 503, code="database_unavailable")

        proxy.restore()
        recovered: list[httpx.Response] = []

        def serves_again() -> bool:
            recovered.append(fault_farm.chat(marker("db-after"), max_tokens=5, base_url=base_url))
            return recovered[-1].status_code == 200

        wait_for(serves_again, timeout=30, what="the API to serve again")
        assert_full_completion(recovered[-1], 5)
        assert all(r.status_code in (200, 503) for r in recovered), [r.status_code for r in recovered]
        with fault_farm.db.unblock():  # nothing was accepted while the database was out of reach
            assert not fault_farm._jobs().filter(request__messages__0__content__in=cut_contents).exists()
    finally:
        fault_farm.processes.stop("api-proxied")
        proxy.close()
    fault_farm.wait_idle()


def test_a_worker_whose_engine_died_is_quarantined_and_its_jobs_retried(fault_farm: FaultFarm) -> None:
    serving = fault_farm.ensure_workers(at_least=2)
    broken, healthy = serving[0], serving[1:]
    engine_cores = [
        p
        for p in fault_farm.processes.descendants(broken)
        if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline())
    ]
    assert len(engine_cores) == 1, [(p.pid, p.name()) for p in fault_farm.processes.descendants(broken)]
    engine_cores[0].kill()
    engine_cores[0].wait(timeout=10)

    contents = [marker(f"quarantine-{i}") for i in range(8)]
    # The healthy engines are paused until the broken worker has quarantined itself: otherwise they could take
    # and finish the jobs before the broken one has failed enough of them to stop.
    with fault_farm.engines_paused([name for name in fault_farm.worker_names() if name != broken]):
        responses = [fault_farm.submit(content, max_tokens=32) for content in contents]
        wait_for(
            lambda: fault_farm.registry().get(broken, {}).get("status") == "quarantined",
            timeout=60,
            what=f"{broken} to report itself quarantined",
        )
    for response in responses:
        assert_full_completion(response.result(timeout=240), 32)
    job_ids = [str(fault_farm.job_of(content).pk) for content in contents]
    rows = fault_farm.wait_terminal(job_ids, timeout=60)

    entry = orjson.loads(fault_farm.redis.get(redis_keys.worker(broken)))
    assert entry["status"] == "quarantined"
    assert entry["load"]["consecutive_failures"] >= QUARANTINE_AFTER

    retried = 0
    for job_id in job_ids:
        job, events = rows[job_id], fault_farm.events(job_id)
        assert job.status == "succeeded", (job.status, job.error, kinds(events))
        assert job.worker_id in healthy
        assert_one_terminal_event(events, "succeeded")
        assert [e.kind for e in events if e.kind == "running" and e.worker_id in healthy] == ["running"]
        retried += job.attempt > 1
    TIMINGS["quarantine: jobs retried after hitting the dead engine"] = retried
    assert retried >= 1

    # Quarantined, it takes no more work: new requests run first time on a healthy worker.
    after = [marker(f"after-quarantine-{i}") for i in range(4)]
    for response in [fault_farm.submit(content, max_tokens=16) for content in after]:
        assert_full_completion(response.result(timeout=120), 16)
    after_ids = [str(fault_farm.job_of(content).pk) for content in after]
    for job in fault_farm.wait_terminal(after_ids, timeout=30).values():
        assert (job.status, job.attempt) == ("succeeded", 1)
        assert job.worker_id in healthy
    fault_farm.wait_idle()
