"""Per-key rate limits and token quotas, checked and reserved atomically in Redis before a job is created.

Three limits, all optional, from the key's cached `KeyPolicy`:
- requests per minute (RPM) and tokens per minute (TPM): token buckets of capacity = the limit that refill
  continuously (limit / 60 per second), so a burst can take the whole minute's allowance at once, then the key
  gets a steady rate: over any 60 s the key is admitted at most 2 x the limit, and from a full bucket a burst of any
  size admits exactly the limit;
- a token quota per UTC day or calendar month: a counter that starts at 0 each period.

One Lua script reads the three, decides, and reserves a request and the request's token cost in all of them, or in
none: concurrent requests cannot overshoot a limit (Redis runs a script alone). The cost reserved is
`prompt_token_estimate` (characters / 4, rounded up, + 4 per chat message: the API has no tokenizer) + the
request's `max_tokens` (or the key's cap, else FARM_RATE_LIMIT_DEFAULT_MAX_TOKENS, when the client set none).
`rate_limit_settle` corrects the TPM bucket and the quota to the tokens the job really used once the API sees its
end; a stream its client abandoned is settled to the prompt estimate + the tokens streamed until then.
"""

from __future__ import annotations

import asyncio
import calendar
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from farm import redis_keys
from farm.api_keys import KeyPolicy, KeyPrincipal
from farm.errors import FarmError
from farm.metrics import RATE_LIMIT_REJECTIONS
from farm.models import OnLimit, QuotaPeriod
from settings import env

WINDOW_MS = 60_000
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4

# KEYS: request bucket, token bucket, quota counter. ARGV: rpm, tpm, quota (0 = no limit), cost, quota ttl (ms),
# quota reset (ms from now), now (ms; empty = Redis TIME, so API replicas share one clock).
# Returns: admitted, reason (0 ok, 1 requests, 2 tokens, 3 quota, 4 request larger than the TPM limit),
# retry after (ms), requests remaining, requests reset (ms), tokens remaining, tokens reset (ms), quota used.
_RESERVE = """
local rpm, tpm, quota = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cost, quota_ttl, quota_reset = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local now
if ARGV[7] ~= '' then now = tonumber(ARGV[7]) else
  local t = redis.call('TIME'); now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) end
local window = 60000
local function level(key, cap)
  if cap <= 0 then return 0 end
  local v = redis.call('HMGET', key, 'level', 'ts')
  local lvl, ts = tonumber(v[1]), tonumber(v[2])
  if lvl == nil then return cap end
  if now > ts then lvl = lvl + (now - ts) * cap / window end
  return math.min(cap, lvl)
end
local req, tok = level(KEYS[1], rpm), level(KEYS[2], tpm)
local used = 0
if quota > 0 then used = tonumber(redis.call('GET', KEYS[3]) or '0') end
local reason, wait = 0, 0
if tpm > 0 and cost > tpm then reason = 4
else
  if rpm > 0 and req < 1 then reason = 1; wait = math.ceil((1 - req) * window / rpm) end
  if tpm > 0 and tok < cost then
    local w = math.ceil((cost - tok) * window / tpm)
    if w > wait then reason = 2; wait = w end
  end
  if quota > 0 and used + cost > quota then reason = 3; wait = quota_reset end
end
if reason == 0 then
  if rpm > 0 then
    req = req - 1
    redis.call('HSET', KEYS[1], 'level', tostring(req), 'ts', tostring(now)); redis.call('PEXPIRE', KEYS[1], window)
  end
  if tpm > 0 then
    tok = tok - cost
    redis.call('HSET', KEYS[2], 'level', tostring(tok), 'ts', tostring(now)); redis.call('PEXPIRE', KEYS[2], window)
  end
  if quota > 0 then
    used = redis.call('INCRBY', KEYS[3], cost); redis.call('PEXPIRE', KEYS[3], quota_ttl)
  end
end
local req_reset, tok_reset = 0, 0
if rpm > 0 then req_reset = math.ceil((rpm - req) * window / rpm) end
if tpm > 0 then tok_reset = math.ceil((tpm - tok) * window / tpm) end
return {reason == 0 and 1 or 0, reason, wait, math.floor(req), req_reset, math.floor(tok), tok_reset, used}
"""

# KEYS: token bucket, quota counter. ARGV: tpm, quota, tokens to give back (negative: charge more), now (ms or '').
_SETTLE = """
local tpm, quota, delta = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now
if ARGV[4] ~= '' then now = tonumber(ARGV[4]) else
  local t = redis.call('TIME'); now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) end
if tpm > 0 then
  local v = redis.call('HMGET', KEYS[1], 'level', 'ts')
  local lvl, ts = tonumber(v[1]), tonumber(v[2])
  if lvl ~= nil then
    if now > ts then lvl = lvl + (now - ts) * tpm / 60000 end
    lvl = math.min(tpm, lvl + delta)
    redis.call('HSET', KEYS[1], 'level', tostring(lvl), 'ts', tostring(math.max(now, ts)))
    redis.call('PEXPIRE', KEYS[1], 60000)
  end
end
if quota > 0 and redis.call('EXISTS', KEYS[2]) == 1 then
  local used = redis.call('DECRBY', KEYS[2], delta)
  if used < 0 then redis.call('SET', KEYS[2], 0, 'KEEPTTL') end
end
return 1
"""

_REASONS = {1: "requests", 2: "tokens", 3: "quota", 4: "too_large"}


@dataclass(frozen=True)
class LimitState:
    """One limit as the `x-ratelimit-*` headers describe it."""

    limit: int
    remaining: int
    reset_ms: int


@dataclass(frozen=True)
class Decision:
    """What the reserve script answered."""

    admitted: bool
    reason: str | None  # requests | tokens | quota | too_large
    retry_after_ms: int
    requests: LimitState | None
    tokens: LimitState | None
    quota_used: int


@dataclass
class Reservation:
    """An admitted request: what it reserved (for `rate_limit_settle`) and the headers its response carries."""

    key_id: int
    policy: KeyPolicy
    tokens: int
    quota_key: str
    headers: dict[str, str] = field(default_factory=dict)
    settled: bool = False
    prompt_tokens: int = 0  # the prompt part of `tokens` (an estimate: the API has no tokenizer)

    def used_if_abandoned(self, streamed_tokens: int) -> int:
        """What a stream its client abandoned used: the prompt (estimated) and the tokens streamed so far."""
        return self.prompt_tokens + streamed_tokens


class RateLimited(FarmError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


def quota_window(period: str, now: float) -> tuple[str, int]:
    """(period id, ms until the period ends) for a UTC day or calendar month containing `now` (epoch seconds)."""
    moment = datetime.fromtimestamp(now, tz=UTC)
    if period == QuotaPeriod.MONTH:
        days = calendar.monthrange(moment.year, moment.month)[1]
        end = datetime(moment.year, moment.month, days, tzinfo=UTC).timestamp() + 86_400
        return moment.strftime("%Y-%m"), max(1, math.ceil((end - now) * 1000))
    end = datetime(moment.year, moment.month, moment.day, tzinfo=UTC).timestamp() + 86_400
    return moment.strftime("%Y-%m-%d"), max(1, math.ceil((end - now) * 1000))


def prompt_token_estimate(request: dict[str, Any]) -> int:
    """An upper-ish estimate of a job request's prompt tokens without a tokenizer (reconciled after the job)."""
    messages = request.get("messages")
    if messages is not None:
        chars = sum(len(str(m.get("content") or "")) for m in messages)
        return math.ceil(chars / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * len(messages)
    return math.ceil(len(str(request.get("prompt") or "")) / CHARS_PER_TOKEN) + 1


def request_token_cost(*, policy: KeyPolicy, request: dict[str, Any]) -> int:
    """Tokens reserved for a request: prompt estimate + the most it may generate."""
    return prompt_token_estimate(request) + completion_token_budget(policy=policy, request=request)


def completion_token_budget(*, policy: KeyPolicy, request: dict[str, Any]) -> int:
    """The most a request may generate: its max_tokens, else the key's cap, else the farm's default."""
    return int(request.get("max_tokens") or policy.max_tokens_cap or env.FARM_RATE_LIMIT_DEFAULT_MAX_TOKENS)


def reset_text(ms: int) -> str:
    """OpenAI's duration format for `x-ratelimit-reset-*`: `20ms`, `1s`, `6m0s`, `1h2m3s`."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    seconds = ms / 1000
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    secs_text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours >= 1:
        return f"{int(hours)}h{int(minutes)}m{secs_text}"
    if minutes >= 1:
        return f"{int(minutes)}m{secs_text}"
    return secs_text


def rate_limit_headers(decision: Decision) -> dict[str, str]:
    """`x-ratelimit-{limit,remaining,reset}-{requests,tokens}` for the limits the key has."""
    headers: dict[str, str] = {}
    for name, state in (("requests", decision.requests), ("tokens", decision.tokens)):
        if state is not None:
            headers[f"x-ratelimit-limit-{name}"] = str(state.limit)
            headers[f"x-ratelimit-remaining-{name}"] = str(max(0, state.remaining))
            headers[f"x-ratelimit-reset-{name}"] = reset_text(state.reset_ms)
    return headers


def _keys(key_id: int, policy: KeyPolicy, now: float) -> tuple[list[str], str, int]:
    period_id, reset_ms = quota_window(policy.quota_period, now)
    quota_key = redis_keys.rate_limit_quota(key_id, period_id)
    return (
        [redis_keys.rate_limit_bucket(key_id, "requests"), redis_keys.rate_limit_bucket(key_id, "tokens"), quota_key],
        quota_key,
        reset_ms,
    )


async def rate_limit_check(
    redis: Any, *, key_id: int, policy: KeyPolicy, cost: int, now: float | None = None
) -> tuple[Decision, str]:
    """Runs the reserve script once: admits and reserves, or changes nothing. `now` (epoch s) only for tests.
    Returns the decision and the quota counter's key."""
    clock = time.time() if now is None else now
    keys, quota_key, reset_ms = _keys(key_id, policy, clock)
    rpm, tpm, quota = policy.rpm_limit or 0, policy.tpm_limit or 0, policy.token_quota or 0
    raw = await redis.eval(
        _RESERVE,
        3,
        *keys,
        rpm,
        tpm,
        quota,
        cost,
        reset_ms + 3_600_000,
        reset_ms,
        "" if now is None else int(now * 1000),
    )
    admitted, reason, wait, req_left, req_reset, tok_left, tok_reset, used = (int(v) for v in raw)
    decision = Decision(
        admitted=bool(admitted),
        reason=_REASONS.get(reason),
        retry_after_ms=wait,
        requests=LimitState(rpm, req_left, req_reset) if rpm else None,
        tokens=LimitState(tpm, tok_left, tok_reset) if tpm else None,
        quota_used=used,
    )
    return decision, quota_key


def _rejection(decision: Decision, policy: KeyPolicy, cost: int) -> RateLimited:
    retry_s = max(1, math.ceil(decision.retry_after_ms / 1000))
    headers = {**rate_limit_headers(decision), "Retry-After": str(retry_s)}
    if decision.reason == "quota":
        return RateLimited(
            f"You exceeded this key's token quota ({policy.token_quota} tokens per {policy.quota_period}; "
            f"{decision.quota_used} used, this request needs {cost}). It resets in "
            f"{reset_text(decision.retry_after_ms)}.",
            type="insufficient_quota",
            code="insufficient_quota",
            headers=headers,
        )
    if decision.reason == "too_large":
        return RateLimited(
            f"Request too large: it needs up to {cost} tokens (prompt estimate + max_tokens) but this key's limit is "
            f"{policy.tpm_limit} tokens per minute. Lower max_tokens or the prompt.",
            type="tokens",
            code="rate_limit_exceeded",
            param="max_tokens",
            headers=headers,
        )
    unit = "requests per min (RPM)" if decision.reason == "requests" else "tokens per min (TPM)"
    limit = policy.rpm_limit if decision.reason == "requests" else policy.tpm_limit
    return RateLimited(
        f"Rate limit reached on {unit}: limit {limit}. Please try again in {reset_text(decision.retry_after_ms)}.",
        type=decision.reason,
        headers=headers,
    )


async def rate_limit_reserve(*, principal: KeyPrincipal, request: dict[str, Any], redis: Any = None) -> Reservation:
    """Admits the request and reserves its cost under every limit of the key, or raises 429 (`RateLimited`).
    A key with `on_limit=wait` first waits (at most FARM_RATE_LIMIT_MAX_WAIT_S) for room that will come in time."""
    policy = principal.policy
    prompt = prompt_token_estimate(request)  # once per request: the cost and the abandoned-stream settle use it
    cost = prompt + completion_token_budget(policy=policy, request=request)
    if not policy.limited:
        return Reservation(key_id=principal.key_id, policy=policy, tokens=cost, quota_key="", prompt_tokens=prompt)
    if redis is None:
        from farm.redis_client import async_redis

        redis = async_redis()
    give_up = time.monotonic() + (env.FARM_RATE_LIMIT_MAX_WAIT_S if policy.on_limit == OnLimit.WAIT else 0.0)
    while True:
        decision, quota_key = await rate_limit_check(redis, key_id=principal.key_id, policy=policy, cost=cost)
        if decision.admitted:
            return Reservation(
                key_id=principal.key_id,
                policy=policy,
                tokens=cost,
                quota_key=quota_key,
                headers=rate_limit_headers(decision),
                prompt_tokens=prompt,
            )
        wait_s = decision.retry_after_ms / 1000
        if decision.reason == "too_large" or time.monotonic() + wait_s > give_up:
            RATE_LIMIT_REJECTIONS.labels(reason=decision.reason or "").inc()
            raise _rejection(decision, policy, cost)
        await asyncio.sleep(wait_s + 0.005)  # another waiter may win the room: then this loop waits again


async def rate_limit_settle(
    reservation: Reservation, *, used_tokens: int | None, redis: Any = None, now: float | None = None
) -> None:
    """Gives back the reserved tokens the job did not use (all of them when it produced nothing: `used_tokens`
    None), in the TPM bucket and in the quota of the period it was reserved in. Idempotent per reservation."""
    policy = reservation.policy
    if reservation.settled or not (policy.tpm_limit or policy.token_quota):
        return
    reservation.settled = True
    delta = reservation.tokens - (used_tokens or 0)
    if delta == 0:
        return
    if redis is None:
        from farm.redis_client import async_redis

        redis = async_redis()
    await redis.eval(
        _SETTLE,
        2,
        redis_keys.rate_limit_bucket(reservation.key_id, "tokens"),
        reservation.quota_key,
        policy.tpm_limit or 0,
        policy.token_quota or 0,
        delta,
        "" if now is None else int(now * 1000),
    )
