"""What key authentication and per-key limits add to a generation request, measured in-process.

  auth (cached)    `api.auth.authenticate(request)`: header parsing, SHA-256 of the key, the per-process cache hit
                   that returns the `KeyPrincipal` with its policy (what nearly every request pays);
  auth (uncached)  the same on a cache miss: one indexed query on the `run_db` pool (once per key per
                   FARM_KEY_CACHE_S per API process);
  policy check     `api_key_check_request` (allow-list, max_tokens cap): pure;
  rate limit       `rate_limit_reserve` for a key with RPM + TPM + quota: one EVALSHA-sized round trip to Redis.

Uses the configured DATABASE_URL / REDIS_URL (a throwaway user and key are created and deleted; the rate-limit
counters of that key expire on their own). Output: p50/p99/mean per step, in microseconds, and
bench/results/auth-overhead-<UTC>.json.

  DATABASE_URL=... REDIS_URL=... .venv/bin/python -m bench.auth_overhead --iterations 20000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def summary(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] / 1000

    return {"p50_us": pct(0.50), "p99_us": pct(0.99), "mean_us": statistics.fmean(ordered) / 1000, "n": len(ordered)}


async def timed(step: Callable[[], Awaitable[Any]], iterations: int) -> list[int]:
    samples = []
    for _ in range(iterations):
        started = time.perf_counter_ns()
        await step()
        samples.append(time.perf_counter_ns() - started)
    return samples


async def measure(raw_key: str, iterations: int) -> dict[str, dict[str, float]]:
    from django.test import RequestFactory

    from api.auth import authenticate
    from farm import api_keys
    from farm.api_keys import api_key_check_request
    from farm.rate_limits import rate_limit_reserve

    request = RequestFactory().post("/v1/chat/completions", HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    principal = await authenticate(request)  # fills the cache
    body = {"messages": [{"role": "user", "content": "Hello there, how are you?"}], "max_tokens": 16}
    results = {}
    await timed(lambda: authenticate(request), 1000)  # warm-up
    results["auth_cached"] = summary(await timed(lambda: authenticate(request), iterations))

    async def uncached() -> None:
        api_keys._cache.clear()
        await authenticate(request)

    results["auth_uncached"] = summary(await timed(uncached, max(200, iterations // 50)))

    async def policy() -> None:
        api_key_check_request(policy=principal.policy, model="tiny-llama", request=body, max_tokens_param="max_tokens")

    results["policy_check"] = summary(await timed(policy, iterations))
    results["rate_limit_reserve"] = summary(
        await timed(lambda: rate_limit_reserve(principal=principal, request=body), max(200, iterations // 10))
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=20_000)
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings.django")
    import django

    django.setup()
    from django.contrib.auth import get_user_model

    from farm.api_keys import api_key_create
    from farm.db import close_pool_connections

    user = get_user_model().objects.create(username=f"bench-auth-{uuid.uuid4().hex[:8]}")
    try:
        # Limits high enough that the benchmark itself is never refused.
        _, raw = api_key_create(
            owner=user,
            name="bench",
            allowed_models=["tiny-llama"],
            max_tokens_cap=1024,
            rpm_limit=10**9,
            tpm_limit=10**9,
            token_quota=10**15,
        )
        results = asyncio.run(measure(raw, args.iterations))
    finally:
        close_pool_connections()
        user.delete()
    print(f"{'step':<22}{'p50 µs':>10}{'p99 µs':>10}{'mean µs':>10}{'n':>8}")
    for name, row in results.items():
        print(f"{name:<22}{row['p50_us']:>10.1f}{row['p99_us']:>10.1f}{row['mean_us']:>10.1f}{row['n']:>8}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"auth-overhead-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps({"iterations": args.iterations, "results": results}, indent=2))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
