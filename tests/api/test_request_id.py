"""Request ids on the live farm: `x-request-id` accepted (when valid) or made, echoed on every response, stored on
the job, and present in the API's and the worker's log lines for that job."""

from __future__ import annotations

import re
import time
import uuid

import httpx
import pytest

from farm.models import Job
from tests.conftest import TINY_MODEL

pytestmark = pytest.mark.live

GENERATED = re.compile(r"^req_[0-9a-f]{32}$")


@pytest.fixture
def database(django_db_blocker):
    """Reads the rows the live farm committed."""
    with django_db_blocker.unblock():
        yield


def chat(live_farm, request_id: str | None = None, **body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {live_farm.api_key}"}
    if request_id is not None:
        headers["x-request-id"] = request_id
    payload = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **body}
    return httpx.post(f"{live_farm.v1}/chat/completions", json=payload, headers=headers, timeout=60)


def wait_for_line(path, *needles: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        for line in path.read_text(errors="replace").splitlines():
            if all(needle in line for needle in needles):
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"no line with {needles} in {path}")
        time.sleep(0.2)


def test_a_clients_request_id_follows_the_job_to_the_worker_logs(live_farm, database) -> None:
    request_id = f"trace-{uuid.uuid4().hex}"
    response = chat(live_farm, request_id)
    assert response.status_code == 200
    assert response.headers["x-request-id"] == request_id
    job = Job.objects.get(request_id=request_id)
    detail = httpx.get(f"{live_farm.v1}/jobs/{job.pk}", headers={"Authorization": f"Bearer {live_farm.api_key}"})
    assert detail.json()["request_id"] == request_id  # the client can find its request's job
    api_line = wait_for_line(live_farm.processes.log_path("api"), f"[{request_id}]", str(job.pk), "queued")
    assert "farm-" in api_line  # the key's visible prefix, never the secret
    assert live_farm.api_key[12:] not in live_farm.processes.log_path("api").read_text(errors="replace")
    # Workers write one INFO line per job, at its end (the "received" line is DEBUG: ~2.5 % of a busy worker's CPU).
    wait_for_line(live_farm.processes.log_path("worker-1"), f"[{request_id}]", str(job.pk), "succeeded")


def test_streamed_responses_carry_the_request_id(live_farm, database) -> None:
    request_id = uuid.uuid4().hex
    headers = {"Authorization": f"Bearer {live_farm.api_key}", "x-request-id": request_id}
    body = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{live_farm.v1}/chat/completions", json=body, headers=headers, timeout=60) as response:
        assert response.status_code == 200 and response.headers["x-request-id"] == request_id
        response.read()
    assert Job.objects.filter(request_id=request_id).count() == 1


@pytest.mark.parametrize("given", [None, "", "x" * 129, "has space", "semi;colon", "é-accent"])
def test_a_missing_or_invalid_request_id_is_replaced_by_a_new_one(live_farm, given: str | None) -> None:
    headers = {"Authorization": f"Bearer {live_farm.api_key}"}
    if given is not None:
        headers["x-request-id"] = given.encode()  # type: ignore[assignment]  (raw bytes: non-ASCII too)
    response = httpx.get(f"{live_farm.v1}/models", headers=headers, timeout=30)
    assert response.status_code == 200
    assert GENERATED.match(response.headers["x-request-id"])


def test_the_longest_valid_request_id_is_kept(live_farm) -> None:
    given = "a" * 128
    response = httpx.get(
        f"{live_farm.v1}/models",
        headers={"Authorization": f"Bearer {live_farm.api_key}", "x-request-id": given},
        timeout=30,
    )
    assert response.headers["x-request-id"] == given


def test_errors_echo_the_request_id_too(live_farm) -> None:
    cases = {
        "unauthenticated": httpx.post(f"{live_farm.v1}/chat/completions", json={}, headers={"x-request-id": "e-401"}),
        "invalid": chat(live_farm, "e-400", max_tokens=-1),
        "unknown-model": chat(live_farm, "e-404", model="no-such-model"),
        "unknown-url": httpx.get(f"{live_farm.v1}/nope", headers={"x-request-id": "e-url"}),
    }
    assert {name: (r.status_code, r.headers.get("x-request-id")) for name, r in cases.items()} == {
        "unauthenticated": (401, "e-401"),
        "invalid": (400, "e-400"),
        "unknown-model": (404, "e-404"),
        "unknown-url": (404, "e-url"),
    }
    assert all(set(r.json()["error"]) == {"message", "type", "param", "code"} for r in cases.values())
