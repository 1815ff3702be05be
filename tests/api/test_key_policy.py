"""Per-key policy on the live farm: allow-lists, the max_tokens cap, rate limits and quotas (checked before any
job exists), `x-ratelimit-*` headers, OpenAI-shaped 429s, and usage recorded for the key's owner."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from farm.api_keys import api_key_create
from farm.jobs import ACTIVE
from farm.models import Job, Usage
from tests.conftest import TINY_MODEL, UNSERVED_MODEL

pytestmark = pytest.mark.live

MESSAGES = [{"role": "user", "content": "Hello"}]
RATE_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)


@pytest.fixture
def owner(committed_user) -> Iterator[Any]:
    """A committed user whose jobs have all ended (and been counted) before it is deleted."""
    yield committed_user
    deadline = time.monotonic() + 60
    while Job.objects.filter(owner=committed_user, status__in=ACTIVE).exists() and time.monotonic() < deadline:
        time.sleep(0.2)


def post(live_farm, key: str, body: dict[str, Any], path: str = "/chat/completions") -> httpx.Response:
    return httpx.post(f"{live_farm.v1}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def rejections_on_metrics(live_farm) -> float:
    """`farm_rate_limit_rejections_total{reason="requests"}` from the API's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{live_farm.base_url}/metrics", timeout=30).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "farm_rate_limit_rejections_total" and sample.labels.get("reason") == "requests"
    )


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": TINY_MODEL, "messages": MESSAGES, "max_tokens": 2, **extra}


def jobs_of(key_id: int) -> int:
    return Job.objects.filter(api_key_id=key_id).count()


def assert_openai_error(response: httpx.Response, status: int, type_: str, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_ and error["param"] == param and error["message"]
    return error


def test_a_model_outside_the_allow_list_is_403_and_creates_no_job(live_farm, owner) -> None:
    key, raw = api_key_create(owner=owner, allowed_models=[UNSERVED_MODEL])
    for path, body in (
        ("/chat/completions", chat()),
        ("/completions", {"model": TINY_MODEL, "prompt": "Hi", "max_tokens": 2}),
    ):
        error = assert_openai_error(post(live_farm, raw, body, path), 403, "permission_error", "model")
        assert error["code"] == "model_not_allowed" and TINY_MODEL in error["message"]
    assert jobs_of(key.pk) == 0
    allowed, allowed_raw = api_key_create(owner=owner, allowed_models=[TINY_MODEL])
    assert post(live_farm, allowed_raw, chat()).status_code == 200
    assert jobs_of(allowed.pk) == 1


def test_max_tokens_over_the_keys_cap_is_400_naming_the_param_and_unset_is_capped(live_farm, owner) -> None:
    key, raw = api_key_create(owner=owner, max_tokens_cap=5)
    error = assert_openai_error(post(live_farm, raw, chat(max_tokens=6)), 400, "invalid_request_error", "max_tokens")
    assert "5" in error["message"]
    assert_openai_error(
        post(live_farm, raw, {"model": TINY_MODEL, "messages": MESSAGES, "max_completion_tokens": 9}),
        400,
        "invalid_request_error",
        "max_completion_tokens",
    )
    assert_openai_error(
        post(live_farm, raw, {"model": TINY_MODEL, "prompt": "Hi", "max_tokens": 50}, "/completions"),
        400,
        "invalid_request_error",
        "max_tokens",
    )
    assert jobs_of(key.pk) == 0
    # No max_tokens at all: the key's cap is the limit (ignore_eos makes the model use all of it).
    response = post(live_farm, raw, {"model": TINY_MODEL, "messages": MESSAGES, "ignore_eos": True})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 5
    assert post(live_farm, raw, chat(max_tokens=5, ignore_eos=True)).json()["usage"]["completion_tokens"] == 5


def test_200_concurrent_requests_at_an_rpm_limit_admit_exactly_the_limit(live_farm, owner) -> None:
    limit = 4
    key, raw = api_key_create(owner=owner, rpm_limit=limit)

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(
            base_url=live_farm.v1, headers={"Authorization": f"Bearer {raw}"}, timeout=180, limits=limits
        ) as client:
            return await asyncio.gather(
                *(client.post("/chat/completions", json=chat(max_tokens=1)) for _ in range(200))
            )

    rejected_before = rejections_on_metrics(live_farm)
    started = time.monotonic()
    responses = asyncio.run(burst())
    elapsed = time.monotonic() - started
    ok = [r for r in responses if r.status_code == 200]
    limited = [r for r in responses if r.status_code == 429]
    # The bucket refills 4/60 per second: a burst shorter than 15 s (requests reserve on arrival, in the first
    # second or two; the rest is the admitted ones generating) gets exactly the limit, never more.
    assert elapsed < 60 / limit, f"burst took {elapsed:.1f}s: refill would blur the count"
    assert len(ok) == limit and len(limited) == 200 - limit, [r.status_code for r in responses]
    assert jobs_of(key.pk) == limit  # refused requests never became jobs
    for response in limited:
        error = assert_openai_error(response, 429, "requests", None)
        assert error["code"] == "rate_limit_exceeded"
        assert int(response.headers["retry-after"]) >= 1
        assert response.headers["x-ratelimit-limit-requests"] == str(limit)
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok) == list(range(limit))
    assert rejections_on_metrics(live_farm) - rejected_before == 200 - limit  # one API process: it saw them all


def test_every_generation_response_carries_the_rate_limit_headers(live_farm, owner) -> None:
    _, raw = api_key_create(owner=owner, rpm_limit=6, tpm_limit=100_000)  # one request back per 10 s
    plain = post(live_farm, raw, chat())
    assert plain.status_code == 200
    assert all(name in plain.headers for name in RATE_HEADERS)
    assert plain.headers["x-ratelimit-limit-tokens"] == "100000"
    assert plain.headers["x-ratelimit-remaining-requests"] == "5"
    assert plain.headers["x-ratelimit-reset-requests"] == "10s"  # until the bucket is full again
    with httpx.stream(
        "POST",
        f"{live_farm.v1}/chat/completions",
        json=chat(stream=True),
        headers={"Authorization": f"Bearer {raw}"},
        timeout=60,
    ) as streamed:
        assert streamed.status_code == 200
        assert streamed.headers["x-ratelimit-remaining-requests"] == "4"
        assert b"[DONE]" in streamed.read()
    # An error after admission (an unserved model: 503) still says where the key stands.
    unserved = post(live_farm, raw, {"model": UNSERVED_MODEL, "messages": MESSAGES, "max_tokens": 2})
    assert unserved.status_code == 503 and unserved.headers["x-ratelimit-remaining-requests"] == "3"


def test_a_spent_token_quota_is_429_insufficient_quota(live_farm, owner) -> None:
    key, raw = api_key_create(owner=owner, token_quota=40, quota_period="month")
    first = post(live_farm, raw, chat(max_tokens=30))  # reserves ~3 + 30 tokens; settles to what it used
    assert first.status_code == 200, first.text
    used = first.json()["usage"]["total_tokens"]
    second = post(live_farm, raw, chat(max_tokens=max(1, 40 - used + 1)))  # more than is left, however it settled
    error = assert_openai_error(second, 429, "insufficient_quota", None)
    assert error["code"] == "insufficient_quota" and "month" in error["message"]
    assert int(second.headers["retry-after"]) > 3600  # the month's end, not seconds
    assert jobs_of(key.pk) == 1


def test_an_abandoned_stream_gives_back_the_tokens_it_did_not_use(live_farm, owner) -> None:
    """A client that closes its stream after the first chunk is charged its prompt and what was streamed to it, not
    the max_tokens it reserved; the job is canceled and counts what its engine made (at least what was streamed)."""
    from django.utils import timezone

    from farm import redis_keys
    from farm.rate_limits import prompt_token_estimate
    from farm.redis_client import sync_redis

    key, raw = api_key_create(owner=owner, token_quota=100_000, quota_period="month")
    body = chat(stream=True, max_tokens=900, ignore_eos=True)
    prompt = prompt_token_estimate(body)
    counter = redis_keys.rate_limit_quota(key.pk, timezone.now().strftime("%Y-%m"))
    first_token, close = threading.Event(), threading.Event()

    def client() -> None:
        with httpx.stream(
            "POST",
            f"{live_farm.v1}/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {raw}"},
            timeout=60,
        ) as streamed:
            assert streamed.status_code == 200
            for line in streamed.iter_lines():
                if '"content":"' in line and '"content":""' not in line:
                    first_token.set()
                    close.wait(30)
                    return  # leaving the block closes the connection

    # The engines are paused so that the tiny model (900 tokens in about a second) cannot finish before the API
    # notices the client is gone; they run in short steps until the client has its first token.
    workers = [name for name in live_farm.processes.children if name.startswith("worker")]
    thread = threading.Thread(target=client)
    with live_farm.processes.engines_paused(workers) as engines:
        thread.start()
        engines.run_until(first_token.is_set, timeout=60, what="the first token at the client")
        close.set()
        thread.join(30)
        deadline = time.monotonic() + 30
        while not Job.objects.filter(api_key_id=key.pk, status="canceled").exists():  # still paused: it cannot end
            assert time.monotonic() < deadline, "the abandoned job was never canceled"
            time.sleep(0.05)
    assert int(sync_redis().get(counter) or 0) > 0
    deadline = time.monotonic() + 30
    while int(sync_redis().get(counter)) >= prompt + 900:  # the settle follows the cancel
        assert time.monotonic() < deadline, "the reservation was never settled"
        time.sleep(0.1)
    job = Job.objects.get(api_key_id=key.pk)
    while job.usage is None and time.monotonic() < deadline:  # the worker's report of the aborted attempt
        time.sleep(0.1)
        job.refresh_from_db()
    charged = int(sync_redis().get(counter))
    assert job.status == "canceled" and job.usage is not None
    assert prompt + 1 <= charged <= prompt + job.usage["completion_tokens"] < prompt + 900, (charged, job.usage)


def drain_tokens(key_id: int, tpm: int) -> None:
    """Takes a key's whole TPM bucket through the same Lua script the API uses."""
    import redis.asyncio as aioredis

    from farm.api_keys import KeyPolicy
    from farm.rate_limits import rate_limit_check
    from settings import env

    async def drain() -> None:
        client = aioredis.Redis.from_url(env.REDIS_URL)
        try:
            decision, _ = await rate_limit_check(client, key_id=key_id, policy=KeyPolicy(tpm_limit=tpm), cost=tpm)
            assert decision.admitted
        finally:
            await client.aclose()

    asyncio.run(drain())


def test_a_waiting_key_is_served_once_room_comes_and_a_rejecting_key_is_not(live_farm, owner) -> None:
    # 6000 TPM = 100 tokens/s: with an empty bucket, a request reserving ~56 tokens needs ~0.56 s of refill.
    waits, waits_raw = api_key_create(owner=owner, tpm_limit=6000, on_limit="wait")
    rejects, rejects_raw = api_key_create(owner=owner, tpm_limit=6000)
    drain_tokens(rejects.pk, 6000)
    refused = post(live_farm, rejects_raw, chat(max_tokens=50))
    assert_openai_error(refused, 429, "tokens", None)
    # Refilled a little since the drain, but less than the ~56 tokens it needs.
    assert int(refused.headers["x-ratelimit-remaining-tokens"]) < 56 and refused.headers["retry-after"] == "1"
    drain_tokens(waits.pk, 6000)
    started = time.monotonic()
    response = post(live_farm, waits_raw, chat(max_tokens=50))
    assert response.status_code == 200, response.text
    assert time.monotonic() - started >= 0.4
    assert jobs_of(rejects.pk) == 0 and jobs_of(waits.pk) == 1


def test_usage_is_recorded_per_key_and_model_and_shown_to_its_owner_only(live_farm, owner) -> None:
    key, raw = api_key_create(owner=owner)
    totals = {"prompt_tokens": 0, "completion_tokens": 0}
    for n in (3, 4):
        body = post(live_farm, raw, chat(max_tokens=n, ignore_eos=True)).json()
        for name in totals:
            totals[name] += body["usage"][name]
    deadline = time.monotonic() + 30  # the control worker applies the success events
    while time.monotonic() < deadline:
        row = (
            Usage.objects.filter(api_key=key, model=TINY_MODEL)
            .values("requests", "prompt_tokens", "completion_tokens")
            .first()
        )
        if row and row["requests"] == 2:
            break
        time.sleep(0.2)
    assert row == {"requests": 2, **totals}
    mine = httpx.get(f"{live_farm.v1}/usage", headers={"Authorization": f"Bearer {raw}"}).json()
    assert [(r["model"], r["requests"], r["completion_tokens"]) for r in mine["data"]] == [(TINY_MODEL, 2, 7)]
    theirs = httpx.get(f"{live_farm.v1}/usage", headers={"Authorization": f"Bearer {live_farm.other_api_key}"}).json()
    assert all(r["api_key"] != key.prefix for r in theirs["data"])
