"""The operator's view against a live farm (real API, control worker and vLLM worker on the tiny model):

- an admin drain / resume reaches the live worker (its heartbeat and its Celery consumers follow);
- `/metrics` on the API and on the worker, parsed with prometheus_client's parser;
- Flower, started as `make run` starts it, answers with the farm's workers and queue names;
- a browser (Playwright + Debian's Chromium, headless) logs into the admin, sees the live worker on the cluster
  overview, cancels a running job with the admin action, and saves screenshots under `test-artifacts/`.
"""

from __future__ import annotations

import base64
import shutil
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import orjson
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from farm import processes, queues, redis_keys
from farm.worker_control import worker_drain, worker_resume
from settings import env
from tests.conftest import TINY_MODEL, TINY_SPEC, LiveFarm
from tests.live_farm import wait_for
from tests.services import free_port

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WORKER = "worker-1"


def registry_entry(worker_id: str = WORKER) -> dict:
    raw = redis.Redis.from_url(env.REDIS_URL).get(redis_keys.worker(worker_id))
    return orjson.loads(raw) if raw else {}


def celery_name(worker_id: str = WORKER) -> str:
    return f"{worker_id}@{registry_entry(worker_id)['hostname']}"


def consumed_queues(worker_id: str = WORKER) -> set[str] | None:
    """The queues a live Celery worker consumes, asked over the broker (Celery remote control)."""
    from farm.celery import app

    name = celery_name(worker_id)
    replies = app.control.inspect(destination=[name], timeout=3).active_queues() or {}
    return {queue["name"] for queue in replies[name]} if name in replies else None


def consumes_infer_queue(worker_id: str = WORKER) -> bool | None:
    """Whether the live worker lists its spec's queue as consumed (None: it did not answer)."""
    consumed = consumed_queues(worker_id)
    return None if consumed is None else queues.infer_queue(TINY_SPEC) in consumed


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def chat(openai_client: openai.OpenAI, content: str, max_tokens: int = 8):
    return openai_client.chat.completions.create(
        model=TINY_MODEL, messages=[{"role": "user", "content": content}], max_tokens=max_tokens
    )


def test_drain_and_resume_reach_the_live_worker(live_farm: LiveFarm, openai_client: openai.OpenAI) -> None:
    # The heartbeat starts while Celery is still starting: wait for its consumer before the first command.
    wait_for(lambda: consumes_infer_queue() is True, timeout=60, what="the worker's consumer")
    try:
        started = time.monotonic()
        assert worker_drain(worker_id=WORKER, by="test") >= 1
        wait_for(lambda: registry_entry().get("status") == "draining", timeout=10, what="the worker to report draining")
        drained_after = time.monotonic() - started
        wait_for(lambda: consumes_infer_queue() is False, timeout=10, what="the worker to stop consuming")
    finally:
        worker_resume(worker_id=WORKER, by="test")
    wait_for(lambda: registry_entry().get("status") == "ready", timeout=10, what="the worker to report ready")
    wait_for(lambda: consumes_infer_queue() is True, timeout=10, what="consuming again")
    assert chat(openai_client, "back to work?").choices[0].finish_reason in ("stop", "length")
    print(f"\ndrain reported in the heartbeat after {drained_after:.2f}s")


def test_api_and_worker_metrics(live_farm: LiveFarm, openai_client: openai.OpenAI) -> None:
    reply = chat(openai_client, "metrics please", max_tokens=6)
    tokens = reply.usage.completion_tokens
    api: dict = {}

    def scraped_with_the_job_done() -> bool:
        """The job's row turns `succeeded` when the control worker applies the worker's event, shortly after the
        reply (`gpu_workers.job_events`)."""
        nonlocal api, text, scrape_s
        started = time.perf_counter()
        with urllib.request.urlopen(f"{live_farm.base_url}/metrics", timeout=10) as response:
            text = response.read().decode()
        scrape_s = time.perf_counter() - started
        api = metric_samples(text)
        return api.get(("farm_jobs", (("status", "succeeded"),)), 0) >= 1

    text, scrape_s = "", 0.0
    wait_for(scraped_with_the_job_done, timeout=15, what="the job's row to turn succeeded")
    print(f"\nAPI /metrics: {len(text)} bytes, {len(api)} samples in {scrape_s * 1000:.0f} ms")
    queue = (("queue", queues.infer_queue(TINY_SPEC)),)
    assert ("farm_queue_depth", queue) in api
    assert ("farm_queue_oldest_pending_seconds", queue) in api
    assert {labels[0][1] for (name, labels) in api if name == "farm_jobs"} == {
        "queued",
        "running",
        "succeeded",
        "failed",
        "canceled",
        "timed_out",
    }
    assert ("farm_worker_tokens_per_second", (("worker", WORKER),)) in api
    assert api[("farm_workers", (("status", "ready"),))] >= 1

    def worker_metrics() -> dict:
        with urllib.request.urlopen(live_farm.worker_metrics_url, timeout=10) as response:
            return metric_samples(response.read().decode())

    own = worker_metrics()
    assert own[("farm_worker_status", (("status", "ready"),))] == 1
    assert own[("farm_worker_capacity", ())] == 32
    assert own[("farm_worker_completion_tokens_total", ())] >= tokens
    assert own[("farm_worker_jobs_completed_total", ())] >= 1


def test_flower_lists_the_farm_workers_and_queues(live_farm: LiveFarm) -> None:
    port = free_port()
    farm = live_farm.processes
    farm.start("flower", processes.flower_command(broker_url=env.REDIS_URL, port=port, basic_auth="ops:fl0wer-pw"))
    base = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        wait_for(lambda: _status(f"{base}/healthcheck") == 200, timeout=60, farm=farm, what="Flower")
        print(f"\nFlower answered after {time.monotonic() - started:.1f}s")
        assert _status(f"{base}/api/workers") == 401  # basic auth from the settings' FLOWER_BASIC_AUTH format
        request = urllib.request.Request(
            f"{base}/api/workers?refresh=1",
            headers={"Authorization": "Basic " + base64.b64encode(b"ops:fl0wer-pw").decode()},
        )
        workers: dict = {}

        def listed() -> bool:
            nonlocal workers
            with urllib.request.urlopen(request, timeout=15) as response:
                workers = orjson.loads(response.read())
            return any(name.startswith(f"{WORKER}@") for name in workers) and any(
                name.startswith("control@") for name in workers
            )

        wait_for(listed, timeout=45, farm=farm, what="Flower to list the farm's workers")
        queues_of = {name: {q["name"] for q in info.get("active_queues") or []} for name, info in workers.items()}
        # its inference queue, which its engine loop pops (Celery's consumer lists it), and its own queue
        assert queues_of[celery_name()] == {queues.infer_queue(TINY_SPEC), queues.worker_queue(WORKER)}
        control = next(name for name in workers if name.startswith("control@"))
        assert queues_of[control] == {queues.CONTROL_QUEUE}
    finally:
        farm.stop("flower")


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@pytest.fixture
def staff_login(live_farm: LiveFarm, django_db_blocker) -> Iterator[tuple[str, str]]:
    from django.contrib.auth import get_user_model

    from farm.db import close_pool_connections

    username, password = f"browser-ops-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    with django_db_blocker.unblock():
        user = get_user_model().objects.create_superuser(username, password=password)
        try:
            yield username, password
        finally:
            close_pool_connections()
            user.delete()


def test_browser_admin_overview_and_cancel(
    live_farm: LiveFarm, openai_client: openai.OpenAI, staff_login, django_db_blocker
) -> None:
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")

    from farm.models import Job, JobStatus

    marker = f"browser-cancel-{uuid.uuid4().hex[:8]}"
    outcome: dict = {}

    def long_stream() -> None:  # 900 tokens (about 10 s here): still running when the operator cancels it
        try:
            stream = openai_client.chat.completions.create(
                model=TINY_MODEL,
                messages=[{"role": "user", "content": marker}],
                max_tokens=900,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            outcome["chunks"] = sum(1 for _ in stream)
        except openai.APIError as exc:
            outcome["error"] = exc

    def job_row(**filters) -> Job | None:
        with django_db_blocker.unblock():
            return Job.objects.filter(request__messages__0__content=marker, **filters).first()

    # The tiny model writes 900 tokens in a second or two, and pausing it once its first tokens were out lost that
    # race once (its engine had already produced them all). So the engines are paused (SIGSTOP) before the request:
    # the worker still takes the job and reports it running, and the job stays running while the operator clicks.
    workers = [name for name in live_farm.processes.children if name.startswith("worker")]
    client_thread = threading.Thread(target=long_stream)
    with live_farm.processes.engines_paused(workers):
        client_thread.start()
        wait_for(lambda: job_row(status=JobStatus.RUNNING) is not None, timeout=30, what="the row to say running")
        assert client_thread.is_alive(), f"the long request ended before the cancel: {outcome}"
        job = job_row()
        _cancel_in_the_admin(live_farm, staff_login, job)
    client_thread.join(timeout=30)
    assert not client_thread.is_alive(), "the client's stream did not end after the cancel"
    with django_db_blocker.unblock():
        job.refresh_from_db()
    assert job.status == JobStatus.CANCELED
    assert "error" in outcome or outcome.get("chunks", 900) < 900  # the stream stopped early
    assert (ARTIFACTS / "admin-cluster-overview.png").stat().st_size > 10_000


def _cancel_in_the_admin(live_farm: LiveFarm, staff_login, job) -> None:
    """Logs into the admin, checks the cluster overview, cancels `job` with the admin action; screenshots both."""
    from playwright.sync_api import expect, sync_playwright

    username, password = staff_login
    ARTIFACTS.mkdir(exist_ok=True)
    admin = f"{live_farm.base_url}/{env.FARM_ADMIN_PATH}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{admin}login/")
            page.fill("#id_username", username)
            page.fill("#id_password", password)
            page.click("input[type=submit]")
            expect(page.locator("#farm-operations")).to_be_visible()

            page.goto(f"{admin}cluster/?refresh=0")
            row = page.locator(f'tr.worker[data-worker-id="{WORKER}"]')
            expect(row).to_be_visible()
            expect(row.locator(".farm-badge")).to_have_text("ready")
            expect(page.locator("#queues")).to_contain_text(queues.infer_queue(TINY_SPEC))
            page.screenshot(path=str(ARTIFACTS / "admin-cluster-overview.png"), full_page=True)

            page.goto(f"{admin}farm/job/?status__exact=running&q={job.pk}")
            page.screenshot(path=str(ARTIFACTS / "admin-job-list.png"), full_page=True)
            page.check(f'input[name="_selected_action"][value="{job.pk}"]')
            page.select_option('select[name="action"]', "cancel_jobs")
            page.click('button[name="index"]')
            expect(page.locator("ul.messagelist")).to_contain_text("Canceled 1")
            page.screenshot(path=str(ARTIFACTS / "admin-job-canceled.png"), full_page=True)
        finally:
            browser.close()
