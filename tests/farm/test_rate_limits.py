"""Per-key rate limits and quotas (`farm.rate_limits`) against the real Redis: the Lua script decides and reserves."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis

from farm import rate_limits
from farm.api_keys import KeyPolicy, KeyPrincipal
from farm.metrics import RATE_LIMIT_REJECTIONS
from farm.rate_limits import (
    RateLimited,
    prompt_token_estimate,
    quota_window,
    rate_limit_check,
    rate_limit_reserve,
    rate_limit_settle,
    request_token_cost,
    reset_text,
)
from settings import env

NOW = 1_800_000_000.0  # a fixed clock for the script (epoch seconds)


def run(factory: Callable[[aioredis.Redis], Awaitable[Any]]) -> Any:
    """Runs `factory(client)` on a fresh loop with its own client (a pool belongs to one loop)."""

    async def main() -> Any:
        client = aioredis.Redis.from_url(env.REDIS_URL, max_connections=512)
        try:
            return await factory(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def principal(**policy: Any) -> KeyPrincipal:
    """A principal with a fresh key id, so no two tests share counters."""
    return KeyPrincipal(key_id=random.randint(10**8, 10**9), owner_id=1, prefix="farm-test", policy=KeyPolicy(**policy))


def rejections(reason: str) -> float:
    return RATE_LIMIT_REJECTIONS.labels(reason=reason)._value.get()


async def burst(client: aioredis.Redis, who: KeyPrincipal, request: dict[str, Any], n: int) -> list[Any]:
    """`n` concurrent reservations; each result is a Reservation or the RateLimited it raised."""
    return await asyncio.gather(
        *(rate_limit_reserve(principal=who, request=request, redis=client) for _ in range(n)), return_exceptions=True
    )


@pytest.mark.parametrize("limit", [1, 17, 50])
def test_a_200_request_burst_admits_exactly_the_rpm_limit(limit: int) -> None:
    who = principal(rpm_limit=limit)
    before = rejections("requests")
    results = run(lambda client: burst(client, who, {"prompt": "hi", "max_tokens": 4}, 200))
    admitted = [r for r in results if isinstance(r, rate_limits.Reservation)]
    refused = [r for r in results if isinstance(r, RateLimited)]
    # The bucket refills limit/60 per second: the burst takes well under 60/limit seconds, so not one more request.
    assert len(admitted) == limit
    assert len(refused) == 200 - limit
    assert all(r.status == 429 and r.type == "requests" and r.code == "rate_limit_exceeded" for r in refused)
    assert all(
        int(r.headers["Retry-After"]) >= 1 and r.headers["x-ratelimit-remaining-requests"] == "0" for r in refused
    )
    assert rejections("requests") - before == 200 - limit
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in admitted)
    assert remaining == list(range(limit))  # each admitted request saw its own reservation


def test_a_200_request_burst_never_exceeds_the_token_quota() -> None:
    request = {"prompt": "x" * 40, "max_tokens": 90}  # 10 + 1 prompt estimate + 90 = 101 tokens reserved
    cost = request_token_cost(policy=KeyPolicy(), request=request)
    assert cost == 101
    who = principal(token_quota=cost * 7 + 50)
    before = rejections("quota")
    results = run(lambda client: burst(client, who, request, 200))
    admitted = [r for r in results if isinstance(r, rate_limits.Reservation)]
    refused = [r for r in results if isinstance(r, RateLimited)]
    assert len(admitted) == 7 and len(refused) == 193
    assert {r.type for r in refused} == {"insufficient_quota"}
    assert rejections("quota") - before == 193


def test_a_200_request_burst_never_exceeds_the_tpm_limit() -> None:
    request = {"prompt": "abcd", "max_tokens": 19}  # 2 + 19 = 21 tokens
    who = principal(tpm_limit=21 * 11 + 20, rpm_limit=1000)
    results = run(lambda client: burst(client, who, request, 200))
    admitted = [r for r in results if isinstance(r, rate_limits.Reservation)]
    assert len(admitted) == 11
    assert {r.type for r in results if isinstance(r, RateLimited)} == {"tokens"}


def test_buckets_refill_continuously_and_report_their_reset() -> None:
    who = principal(rpm_limit=6, tpm_limit=600)

    async def scenario(client: aioredis.Redis) -> list[rate_limits.Decision]:
        seen = []
        for at, cost in ((0, 100), (0, 100), (0, 400), (0, 1), (30, 300), (30, 1), (60, 1)):
            decision, _ = await rate_limit_check(client, key_id=who.key_id, policy=who.policy, cost=cost, now=NOW + at)
            seen.append(decision)
        return seen

    d = run(scenario)
    assert [x.admitted for x in d] == [True, True, True, False, True, False, True]
    assert d[2].tokens == rate_limits.LimitState(limit=600, remaining=0, reset_ms=60_000)
    assert d[2].requests == rate_limits.LimitState(limit=6, remaining=3, reset_ms=30_000)
    # 600 tokens used at t=0: one more token needs 0.1 s of refill (10 tokens/s).
    assert d[3].reason == "tokens" and d[3].retry_after_ms == 100
    # At t=30 half the bucket (300 tokens) is back; a 300-token request takes it all.
    assert d[4].tokens is not None and d[4].tokens.remaining == 0
    assert d[5].reason == "tokens" and not d[5].admitted
    assert d[6].admitted and d[6].tokens is not None and d[6].tokens.remaining == 299


def test_a_refused_request_reserves_nothing() -> None:
    who = principal(rpm_limit=10, token_quota=100)

    async def scenario(client: aioredis.Redis) -> tuple[rate_limits.Decision, rate_limits.Decision]:
        refused, _ = await rate_limit_check(client, key_id=who.key_id, policy=who.policy, cost=101, now=NOW)
        fits, _ = await rate_limit_check(client, key_id=who.key_id, policy=who.policy, cost=100, now=NOW)
        return refused, fits

    refused, fits = run(scenario)
    assert not refused.admitted and refused.reason == "quota" and refused.quota_used == 0
    assert fits.admitted and fits.quota_used == 100 and fits.requests is not None and fits.requests.remaining == 9


def test_a_request_larger_than_the_tpm_limit_is_refused_at_once_even_when_the_key_waits(monkeypatch) -> None:
    monkeypatch.setattr(env, "FARM_RATE_LIMIT_MAX_WAIT_S", 30.0)
    who = principal(tpm_limit=50, on_limit="wait")
    with pytest.raises(RateLimited) as caught:
        run(lambda client: rate_limit_reserve(principal=who, request={"prompt": "hi", "max_tokens": 60}, redis=client))
    assert caught.value.param == "max_tokens" and "Request too large" in caught.value.message


def test_a_waiting_key_is_admitted_when_room_comes_within_the_bound(monkeypatch) -> None:
    monkeypatch.setattr(env, "FARM_RATE_LIMIT_MAX_WAIT_S", 5.0)
    waits = principal(tpm_limit=6000, on_limit="wait")  # 100 tokens per second
    rejects = principal(tpm_limit=6000)
    big = {"prompt": "", "max_tokens": 5999}  # 1 + 5999: the whole bucket
    small = {"prompt": "", "max_tokens": 99}  # 100 tokens: one second of refill

    async def scenario(client: aioredis.Redis) -> tuple[float, BaseException | None]:
        loop = asyncio.get_running_loop()
        await rate_limit_reserve(principal=waits, request=big, redis=client)
        await rate_limit_reserve(principal=rejects, request=big, redis=client)
        refused: BaseException | None = None
        try:
            await rate_limit_reserve(principal=rejects, request=small, redis=client)
        except RateLimited as exc:
            refused = exc
        started = loop.time()
        await rate_limit_reserve(principal=waits, request=small, redis=client)
        return loop.time() - started, refused

    waited, refused = run(scenario)
    assert 0.5 < waited < 3.0
    assert isinstance(refused, RateLimited) and refused.headers["Retry-After"] == "1"


def test_a_waiting_key_gets_429_when_room_would_come_too_late(monkeypatch) -> None:
    monkeypatch.setattr(env, "FARM_RATE_LIMIT_MAX_WAIT_S", 0.5)
    who = principal(rpm_limit=1, on_limit="wait")

    async def scenario(client: aioredis.Redis) -> None:
        await rate_limit_reserve(principal=who, request={"prompt": "hi"}, redis=client)
        await rate_limit_reserve(principal=who, request={"prompt": "hi"}, redis=client)

    with pytest.raises(RateLimited) as caught:
        run(scenario)
    assert caught.value.headers["Retry-After"] == "60"


def test_settling_gives_back_unused_tokens_to_the_bucket_and_the_quota() -> None:
    who = principal(tpm_limit=1000, token_quota=5000)
    request = {"prompt": "", "max_tokens": 399}  # 400 reserved

    async def scenario(client: aioredis.Redis) -> tuple[int, int, str | None, str | None]:
        reservation = await rate_limit_reserve(principal=who, request=request, redis=client)
        assert reservation.headers["x-ratelimit-remaining-tokens"] == "600"
        await rate_limit_settle(reservation, used_tokens=150, redis=client)
        await rate_limit_settle(reservation, used_tokens=150, redis=client)  # once only
        used = int(await client.get(reservation.quota_key))
        failed = await rate_limit_reserve(principal=who, request=request, redis=client)
        await rate_limit_settle(failed, used_tokens=None, redis=client)  # the job produced nothing: all back
        after = int(await client.get(reservation.quota_key))
        level = await client.hget(f"farm:rl:{{{who.key_id}}}:tokens", "level")
        ttl = await client.pttl(reservation.quota_key)
        return used, after, level, ttl

    used, after, level, ttl = run(scenario)
    assert used == 150 and after == 150
    assert 849 <= float(level) <= 851  # 1000 - 150, plus a few ms of refill
    assert ttl > 3_600_000  # lives past the end of its period


def test_unlimited_keys_touch_no_counter() -> None:
    who = principal(max_tokens_cap=100)

    async def scenario(client: aioredis.Redis) -> rate_limits.Reservation:
        reservation = await rate_limit_reserve(principal=who, request={"prompt": "x"}, redis=client)
        assert not await client.keys(f"farm:rl:{{{who.key_id}}}:*")
        return reservation

    reservation = run(scenario)
    assert reservation.headers == {} and reservation.tokens == 2 + 100  # the key's cap stands in for max_tokens


def test_prompt_estimate_and_cost() -> None:
    chat = {
        "messages": [{"role": "system", "content": "x" * 9}, {"role": "user", "content": "y" * 3}],
        "max_tokens": None,
    }
    assert prompt_token_estimate(chat) == 3 + 8
    assert request_token_cost(policy=KeyPolicy(), request=chat) == 11 + env.FARM_RATE_LIMIT_DEFAULT_MAX_TOKENS
    assert request_token_cost(policy=KeyPolicy(max_tokens_cap=7), request=chat) == 18
    assert request_token_cost(policy=KeyPolicy(max_tokens_cap=7), request={**chat, "max_tokens": 5}) == 16


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0ms"),
        (20, "20ms"),
        (1000, "1s"),
        (1500, "1.5s"),
        (60_000, "1m0s"),
        (360_000, "6m0s"),
        (3_723_000, "1h2m3s"),
    ],
)
def test_reset_text_is_openai_format(ms: int, text: str) -> None:
    assert reset_text(ms) == text


def test_quota_windows_are_utc_days_and_months() -> None:
    at = datetime(2026, 2, 28, 23, 0, tzinfo=UTC).timestamp()
    assert quota_window("day", at) == ("2026-02-28", 3_600_000)
    assert quota_window("month", at) == ("2026-02", 3_600_000)
    assert quota_window("month", datetime(2026, 12, 31, 0, 0, tzinfo=UTC).timestamp()) == ("2026-12", 86_400_000)
