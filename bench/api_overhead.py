"""The API's own CPU per request, measured in-process through its ASGI application (no socket, no uvicorn).

Each request is a chat completion from a valid key for a model that does not exist: it passes the ASGI layers
(request id, disconnect watch, body limit), Django's handler on the event loop (`FarmASGIHandler`), the middleware
chain, key authentication (cached after the first request), body validation and the model lookup, and is answered
404 in the OpenAI error shape with its log line. That is the framework's share of every generation request; the job
row, the publish and the token stream are left out (`bench.control_plane` measures the whole path).

The figure is the process' CPU time (user + system) per request over a round of `--requests`, after a warm-up. On a
shared VM a round is slowed by whatever else runs; the minimum over `--rounds` is the steadiest figure, so compare
two trees by their minimums, their runs interleaved (`git worktree` for the other tree).

Uses the configured DATABASE_URL / REDIS_URL: it migrates the database, creates a throwaway user and key and
deletes them. Output: min / p25 / median per request in microseconds, and bench/results/api-overhead-<UTC>.json.

  DATABASE_URL=... REDIS_URL=... .venv/bin/python -m bench.api_overhead --rounds 15 --requests 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
BODY = b'{"model": "no-such-model", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16}'


def scope_for(raw_key: str) -> dict[str, Any]:
    """What uvicorn hands the application for the request, headers as the openai SDK sends them."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"authorization", f"Bearer {raw_key}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
            (b"user-agent", b"OpenAI/Python 1.0"),
            (b"accept", b"application/json"),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def measure(raw_key: str, *, rounds: int, requests: int) -> list[float]:
    """CPU microseconds per request, one figure per round."""
    from api.asgi import application

    scope = scope_for(raw_key)
    statuses: set[int] = set()

    async def one() -> None:
        received = False

        async def receive() -> dict[str, Any]:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": BODY, "more_body": False}
            await asyncio.sleep(3600)  # the client stays connected
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.add(message["status"])

        await application(dict(scope), receive, send)

    for _ in range(max(200, requests // 2)):  # warm-up: caches, the key, the catalogue
        await one()
    if statuses != {404}:
        raise SystemExit(f"expected every request to be answered 404, got {sorted(statuses)}")
    per_round = []
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(requests):
            await one()
        per_round.append((time.process_time() - started) / requests * 1e6)
    return per_round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15, help="rounds of --requests (default 15)")
    parser.add_argument("--requests", type=int, default=1000, help="requests per round (default 1000)")
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings.django")
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connections

    from farm.api_keys import api_key_create
    from farm.db import close_pool_connections

    call_command("migrate", verbosity=0)
    user = get_user_model().objects.create(username=f"bench-api-{uuid.uuid4().hex[:8]}")
    try:
        _, raw = api_key_create(owner=user, name="bench")
        connections.close_all()  # as in the API: the event loop's thread holds no database connection
        per_round = asyncio.run(measure(raw, rounds=args.rounds, requests=args.requests))
    finally:
        close_pool_connections()
        user.delete()
    ordered = sorted(per_round)
    summary = {
        "min_us": round(ordered[0], 1),
        "p25_us": round(ordered[len(ordered) // 4], 1),
        "median_us": round(statistics.median(ordered), 1),
        "rounds_us": [round(x, 1) for x in per_round],
    }
    print(f"CPU per request (us): min {summary['min_us']}  p25 {summary['p25_us']}  median {summary['median_us']}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"api-overhead-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps({"rounds": args.rounds, "requests": args.requests, **summary}, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
