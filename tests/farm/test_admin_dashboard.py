"""The operator's admin: staff-only cluster overview and usage pages, CSRF-protected worker commands, job cancel and
retry actions, API key creation (shown once) and revocation, and the admin URL setting."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
import redis
from django.contrib.auth import get_user_model
from django.core.exceptions import ImproperlyConfigured
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from farm import queues, redis_keys
from farm.api_keys import api_key_create, api_key_find
from farm.catalog import model_upsert, spec_upsert
from farm.jobs import job_create, job_transition
from farm.models import ApiKey, Job, JobEvent, JobKind, JobStatus, ModelSpec, Usage
from farm.redis_client import sync_redis
from gpu_workers.heartbeat import Heartbeat
from settings import env
from settings.env import admin_path

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parent.parent.parent
SPEC = "admin-test-spec"
WORKER = "admin-test-worker"


@pytest.fixture
def spec() -> Iterator[ModelSpec]:
    made = spec_upsert(model=model_upsert(name="admin-test-model"), name=SPEC, engine="vllm-cpu")
    sync_redis().delete(queues.infer_queue(SPEC))
    yield made
    sync_redis().delete(queues.infer_queue(SPEC))


@pytest.fixture
def staff() -> Client:
    user = get_user_model().objects.create_superuser("ops", password="pw-ops-123")
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def live_worker() -> Iterator[Heartbeat]:
    heartbeat = Heartbeat(
        client=redis.Redis.from_url(env.REDIS_URL),
        worker_id=WORKER,
        interval_s=60,
        ttl_s=60,
        describe=lambda: {
            "hostname": "cpu-host",
            "specs": [SPEC],
            "status": "ready",
            "hardware": {"kind": "cpu", "cpu_cores": 2, "memory_total_mib": 4096, "memory_available_mib": 1024},
            "load": {"running": 1, "capacity": 4, "tokens_per_s": 7.5},
            "models": [{"spec": SPEC, "model": "admin-test-model", "weights_bytes": 2**30}],
        },
    )
    heartbeat.beat()
    yield heartbeat
    heartbeat.stop()


def make_job(spec: ModelSpec, status: str = JobStatus.QUEUED) -> Job:
    owner = get_user_model().objects.get_or_create(username="admin-job-owner")[0]
    job = job_create(
        owner_id=owner.pk,
        api_key_id=None,
        kind=JobKind.CHAT,
        model_id=spec.model_id,
        spec_id=spec.pk,
        request={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4},
        deadline_at=timezone.now() + timedelta(minutes=2),
    )
    if status != JobStatus.QUEUED:
        assert job_transition(
            job_id=str(job.pk), attempt=None, to=status, detail={"error": {"code": "x", "message": "boom"}}
        )
    return job


def messages_of(response) -> list[str]:
    return [str(m) for m in response.context["messages"]] if response.context else []


@pytest.mark.parametrize("page", ["admin:farm_cluster", "admin:farm_usage", "admin:farm_job_changelist"])
def test_pages_are_staff_only(page: str) -> None:
    anonymous = Client()
    response = anonymous.get(reverse(page))
    assert response.status_code == 302 and "/login/" in response["Location"]
    member = get_user_model().objects.create_user("not-staff", password="pw-member-123")
    client = Client()
    client.force_login(member)
    response = client.get(reverse(page))
    assert response.status_code == 302 and "/login/" in response["Location"]


def test_index_links_the_dashboard_and_flower(staff: Client) -> None:
    body = staff.get(reverse("admin:index")).content.decode()
    assert reverse("admin:farm_cluster") in body
    assert reverse("admin:farm_usage") in body
    assert env.FLOWER_URL in body


def test_cluster_overview(staff: Client, spec: ModelSpec, live_worker: Heartbeat) -> None:
    make_job(spec)
    make_job(spec, JobStatus.FAILED)
    response = staff.get(reverse("admin:farm_cluster"))
    assert response.status_code == 200
    body = response.content.decode()
    assert f'data-worker-id="{WORKER}"' in body
    assert "2 cores" in body and "RAM in use 75.0%" in body  # CPU facts when there is no GPU
    assert queues.infer_queue(SPEC) in body
    assert f"{SPEC}: 1.0 GiB weights" in body
    states = dict(re.findall(r'status__exact=(\w+)">\w+</a></td><td>(\d+)</td>', body))
    assert states == {
        "queued": "0",
        "running": "0",
        "succeeded": "0",
        "failed": "1",
        "canceled": "0",
        "timed_out": "0",
    } | {"queued": "1"}
    assert 'name="drain"' in body and 'name="quarantine"' in body and 'name="resume"' not in body


def test_worker_commands_are_posts_with_a_csrf_token(staff: Client, live_worker: Heartbeat) -> None:
    url = reverse("admin:farm_worker_action", args=[WORKER, "drain"])
    assert staff.get(url).status_code == 405
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(get_user_model().objects.get(username="ops"))
    assert strict.post(url).status_code == 403

    received: list[dict] = []
    pubsub = redis.Redis.from_url(env.REDIS_URL).pubsub()
    pubsub.subscribe(redis_keys.WORKER_CONTROL_CHANNEL)
    pubsub.get_message(timeout=1)  # the subscribe confirmation

    def listen() -> None:
        message = pubsub.get_message(timeout=5, ignore_subscribe_messages=True)
        if message:
            received.append(orjson.loads(message["data"]))

    listener = threading.Thread(target=listen)
    listener.start()
    page = strict.get(reverse("admin:farm_cluster"))
    token = page.cookies["csrftoken"].value
    response = strict.post(url, {"csrfmiddlewaretoken": token}, follow=True)
    listener.join()
    assert response.status_code == 200
    assert received == [{"worker_id": WORKER, "action": "drain", "by": "admin:ops"}]
    assert any("Sent drain" in m for m in messages_of(response))

    response = staff.post(reverse("admin:farm_worker_action", args=["gone-worker", "drain"]), follow=True)
    assert any("not live" in m for m in messages_of(response))


def test_cancel_action(staff: Client, spec: ModelSpec) -> None:
    queued, done = make_job(spec), make_job(spec, JobStatus.SUCCEEDED)
    response = staff.post(
        reverse("admin:farm_job_changelist"),
        {"action": "cancel_jobs", "_selected_action": [str(queued.pk), str(done.pk)]},
        follow=True,
    )
    queued.refresh_from_db()
    assert queued.status == JobStatus.CANCELED
    assert JobEvent.objects.filter(job=queued, kind="canceled", worker_id="admin:ops").exists()
    assert Job.objects.get(pk=done.pk).status == JobStatus.SUCCEEDED
    notes = messages_of(response)
    assert any("Canceled 1" in m for m in notes)
    assert any("cannot be canceled" in m for m in notes)


def test_retry_action_runs_a_failed_job_again_as_a_new_job(
    staff: Client, spec: ModelSpec, django_capture_on_commit_callbacks
) -> None:
    failed, running = make_job(spec, JobStatus.FAILED), make_job(spec)
    job_transition(job_id=str(running.pk), attempt=1, to=JobStatus.RUNNING, worker_id="w")
    sync_redis().delete(queues.infer_queue(SPEC))
    with django_capture_on_commit_callbacks(execute=True):
        response = staff.post(
            reverse("admin:farm_job_changelist"),
            {"action": "retry_jobs", "_selected_action": [str(failed.pk), str(running.pk)]},
            follow=True,
        )
    (retry,) = Job.objects.filter(events__kind="created", events__detail__retry_of=str(failed.pk))
    assert retry.status == JobStatus.QUEUED
    assert (retry.owner_id, retry.spec_id, retry.request) == (failed.owner_id, failed.spec_id, failed.request)
    assert Job.objects.get(pk=failed.pk).status == JobStatus.FAILED  # the original stays as it ended
    assert JobEvent.objects.get(job=failed, kind="retried").detail == {"retry_job_id": str(retry.pk)}
    assert sync_redis().llen(queues.infer_queue(SPEC)) == 1  # dispatched after commit
    notes = messages_of(response)
    assert any("Retried 1" in m for m in notes)
    assert any("only failed or timed-out jobs" in m for m in notes)


def test_job_list_filters(staff: Client, spec: ModelSpec) -> None:
    make_job(spec, JobStatus.FAILED)
    url = reverse("admin:farm_job_changelist")
    owner = get_user_model().objects.get(username="admin-job-owner")
    midnight = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0).isoformat()
    for query in (
        {"status__exact": "failed"},
        {"kind__exact": JobKind.CHAT},
        {"model__id__exact": spec.model_id},
        {"owner__id__exact": owner.pk},
        {"created_at__gte": midnight},
    ):
        response = staff.get(url, query)
        assert response.status_code == 200, query
        assert response.context["cl"].result_count == 1, query
    assert staff.get(url, {"status__exact": "running"}).context["cl"].result_count == 0


def test_api_key_created_in_the_admin_is_shown_once_and_works(staff: Client) -> None:
    owner = get_user_model().objects.create(username="key-owner")
    add_url = reverse("admin:farm_apikey_add")
    form = staff.get(add_url).context["adminform"].form
    data = {}  # the form's defaults (limits and such), as a browser would send them
    for bound in form:
        value = bound.value()
        if value is not None:
            data[bound.name] = orjson.dumps(value).decode() if isinstance(value, list | dict) else value
    data.update(owner=owner.pk, name="from-admin")
    response = staff.post(add_url, data, follow=True)
    notes = messages_of(response)
    shown = [re.search(r"(farm-\S+)$", m) for m in notes]
    raw = next(match.group(1) for match in shown if match)
    key = api_key_find(raw)
    assert key is not None and key.name == "from-admin" and key.owner_id == owner.pk
    assert raw not in staff.get(reverse("admin:farm_apikey_change", args=[key.pk])).content.decode()

    response = staff.post(
        reverse("admin:farm_apikey_changelist"),
        {"action": "revoke_keys", "_selected_action": [str(key.pk)]},
        follow=True,
    )
    assert ApiKey.objects.get(pk=key.pk).revoked_at is not None


def test_usage_page_draws_bars_per_day(staff: Client) -> None:
    owner = get_user_model().objects.create(username="usage-owner")
    key, _ = api_key_create(owner=owner, name="charts")
    today = timezone.now().date()
    Usage.objects.create(
        api_key=key, owner=owner, model="m-a", day=today, requests=3, prompt_tokens=30, completion_tokens=12
    )
    Usage.objects.create(
        api_key=key,
        owner=owner,
        model="m-b",
        day=today - timedelta(days=1),
        requests=1,
        prompt_tokens=5,
        completion_tokens=5,
    )
    body = staff.get(reverse("admin:farm_usage")).content.decode()
    assert "4 requests, 52 tokens" in body
    assert f'data-day="{today}" data-total="42"' in body
    assert body.count('<svg role="img"') == 2  # tokens and requests (the admin has icon SVGs of its own)
    assert re.search(r"<rect [^>]*fill=\"#[0-9a-f]{6}\"><title>[\d-]+ m-a: 42</title>", body)
    body = staff.get(reverse("admin:farm_usage"), {"user": "nobody"}).content.decode()
    assert "0 requests, 0 tokens" in body


@pytest.mark.parametrize(
    ("value", "production", "expected"),
    [
        (None, False, "admin/"),
        (None, True, ""),
        ("ops/console", True, "ops/console/"),
        ("/staff/", False, "staff/"),
        ("off", False, ""),
    ],
)
def test_admin_path_setting(value: str | None, production: bool, expected: str) -> None:
    assert admin_path(value, production=production) == expected


@pytest.mark.parametrize("value", ["v1/admin", "api", "metrics", "a b", "../x"])
def test_admin_path_is_never_on_the_public_api(value: str) -> None:
    with pytest.raises(ImproperlyConfigured):
        admin_path(value, production=True)


def test_a_retry_needs_an_enabled_spec(spec: ModelSpec) -> None:
    from farm.errors import Conflict
    from farm.jobs import job_retry

    failed = make_job(spec, JobStatus.TIMED_OUT)
    ModelSpec.objects.filter(pk=spec.pk).update(enabled=False)
    with pytest.raises(Conflict):
        job_retry(job_id=str(failed.pk))


def test_production_serves_no_admin_unless_asked() -> None:
    """The URL conf of a production API process: no admin by default; FARM_ADMIN_PATH puts it where it says."""
    import os
    import subprocess
    import sys
    import uuid

    probe = (
        "import django; django.setup(); from django.urls import Resolver404, resolve\n"
        "for path in ('/admin/', '/ops/console/'):\n"
        "    try:\n        resolve(path); print(path, 'admin')\n"
        "    except Resolver404:\n        print(path, 'none')\n"
    )
    base = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "settings.django",
        "FARM_ENV": "production",
        "SECRET_KEY": "production-like-secret-" + uuid.uuid4().hex * 2,
        "FLOWER_BASIC_AUTH": "a:b",
        "ALLOWED_HOSTS": "localhost",
        # Required in production; never connected to by this probe (the embedded-defaults run has neither set).
        "DATABASE_URL": os.environ.get("DATABASE_URL") or "sqlite:///unused-production-probe.sqlite3",
        "REDIS_URL": os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0",
    }
    base.pop("FARM_ADMIN_PATH", None)

    def run(**extra: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", probe],
            env={**base, **extra},
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    assert run() == "/admin/ none\n/ops/console/ none\n"
    assert run(FARM_ADMIN_PATH="ops/console") == "/admin/ none\n/ops/console/ admin\n"
    failed = subprocess.run(
        [sys.executable, "-c", probe],
        env={**base, "FARM_ADMIN_PATH": "v1/admin"},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert failed.returncode != 0 and "public API path" in failed.stderr
