"""Control-plane benchmark: the farm's own cost per request, with the engine's cost taken out.

A private farm (`bench.private_farm`: own SQLite, embedded Valkey, API, control worker, one worker) whose worker
serves the spec with the zero-cost engine (`FARM_NULL_ENGINE=1`, `gpu_workers/null_engine.py`): every token is
free, so what is left is the farm's path: HTTP + auth + validation + routing, the job row, the Celery publish, the
worker's claim and events, the Redis token stream, SSE.

Phases:
  sweep    closed-loop load at each --concurrency, streaming and not: requests/s, end-to-end latency p50/p99,
           and per-hop latency from timestamps the farm already records:
             api    client send -> job row created (auth, validation, routing, DB insert)
             queue  job row -> first token in the job's Redis stream (commit, publish, broker, worker receive,
                    claim, engine submit, first write; the stream entry id is Redis' own clock in ms)
             out    first token in Redis -> first content byte at the client (XREAD, SSE)
           and the CPU every process spent during the level, per request (API, control worker, worker, Valkey,
           PostgreSQL's server with `--postgres`, the bench's own client): what the 2 cores' budget goes to
  rates    --rates R1,R2: open-loop levels (vLLM's method): Poisson arrivals at R requests/s for --rate-seconds,
           the same seeded arrival times for every run; the achieved rate and the latency p50/p99 at that load (the
           issue's "requests/s with p99 added latency <= 50 ms": with the null engine all latency is added); its
           latency second by second in the results (the table names the five worst seconds: a tail spread over
           the level is the load, one packed into a few seconds is a pause) and how late the client itself sent
  streams  --open-streams N concurrent SSE streams held open on ONE API process (the null engine emits a token
           every --token-interval s): errors, and the API process' peak RSS.

--split-cores pins the control plane (API, control worker, PostgreSQL's server) to CPU 0 and the data plane
(worker, Valkey) and the bench's client to CPU 1, as in production where workers and Redis run on other hosts: what
one core of control plane sustains. PostgreSQL's processes get their affinity back at the end.

Output: a table per phase, the verdicts on the bars (>= 500 requests/s with p99 <= 50 ms, closed and open loop;
1,000 open streams with 0 errors and < 1 GiB RSS) and bench/results/control-plane-<UTC>.json.

Examples:
  .venv/bin/python -m bench.control_plane                         # default sweep + 1,000 open streams
  .venv/bin/python -m bench.control_plane --concurrency 1,64 --requests 200 --open-streams 0
  .venv/bin/python -m bench.control_plane --concurrency 8 --rates 200,300,400 --open-streams 0 --modes stream
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil

from bench.arms import cpu_delta, cpu_snapshot, free_port, http_status
from bench.private_farm import PrivateFarm, fresh_database
from bench.report import percentile
from farm.garbage_collection import freeze_startup

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.control_plane", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", default="1,8,32,64,128,256", help="sweep levels (default %(default)s)")
    parser.add_argument(
        "--requests", type=int, default=0, help="requests per level and mode (default: max(100, 4 x concurrency))"
    )
    parser.add_argument("--output-tokens", type=int, default=16, help="tokens per response (default %(default)s)")
    parser.add_argument("--modes", default="stream,json", help="stream, json or both (default %(default)s)")
    parser.add_argument("--rates", default="", help="open-loop levels, requests/s (default: none)")
    parser.add_argument("--rate-seconds", type=float, default=10.0, help="length of each rate level")
    parser.add_argument(
        "--split-cores",
        action="store_true",
        help="control plane (API, control worker, PostgreSQL) on CPU 0; worker, Valkey and the client on CPU 1",
    )
    parser.add_argument("--open-streams", type=int, default=1000, help="streams held open at once; 0 skips")
    parser.add_argument("--stream-tokens", type=int, default=40, help="tokens per held-open stream")
    parser.add_argument(
        "--token-interval",
        type=float,
        default=0.25,
        help="seconds between tokens of a held-open stream (default %(default)s)",
    )
    parser.add_argument(
        "--worker-concurrency",
        type=int,
        default=1100,
        help="worker threads: at least --open-streams (default %(default)s)",
    )
    parser.add_argument(
        "--postgres",
        metavar="URL",
        help="run the farm on fresh databases of this PostgreSQL server (e.g. "
        "postgres://postgres@127.0.0.1:5432/postgres), created and dropped by the bench; default: "
        "SQLite (as `make run`)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=120.0,
        help="seconds a request may take before it counts as an error (default %(default)s): a lost job shows as an "
        "error instead of a run that never ends",
    )
    parser.add_argument(
        "--client-loop",
        choices=("uvloop", "asyncio"),
        default="asyncio",
        help="the load generator's event loop (default %(default)s, as every recorded run): the client shares the "
        "host's cores with the farm. uvloop saved it ~0.03 ms of CPU per request at 500/s (2026-12-07 night), "
        "within the run-to-run spread",
    )
    parser.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    return parser.parse_args(argv)


@dataclass
class Timed:
    sent: float  # time.time() at send
    job_id: str | None
    first_byte: float | None  # time.time() of the first content chunk (stream) or of the body (json)
    done: float
    error: str | None = None
    late: float = 0.0  # open loop: seconds the client sent after the request's arrival time (its own loop's lag)


class Client:
    def __init__(self, base_url: str, api_key: str, model: str, *, request_timeout: float = 120.0) -> None:
        self.url = f"{base_url}/v1/chat/completions"
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=request_timeout)
        )

    async def send(self, *, stream: bool, max_tokens: int) -> Timed:
        body = orjson.dumps(
            {
                "model": self.model,
                "max_tokens": max_tokens,
                "stream": stream,
                "messages": [{"role": "user", "content": f"bench {uuid.uuid4().hex}"}],
            }
        )
        sent = time.time()
        job_id = first = None
        try:
            async with self.session.post(self.url, data=body, headers=self.headers) as response:
                if response.status != 200:
                    return Timed(sent, None, None, time.time(), f"HTTP {response.status}")
                if not stream:
                    payload = orjson.loads(await response.read())
                    now = time.time()
                    return Timed(sent, payload["id"].removeprefix("chatcmpl-"), now, now)
                async for line in response.content:
                    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                        continue
                    chunk = orjson.loads(line[6:])
                    if "error" in chunk:
                        return Timed(sent, job_id, first, time.time(), f"stream error {chunk['error']['code']}")
                    job_id = job_id or chunk["id"].removeprefix("chatcmpl-")
                    if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        first = time.time()
            return Timed(sent, job_id, first, time.time())
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return Timed(sent, job_id, first, time.time(), f"{exc.__class__.__name__}: {exc}"[:200])

    async def close(self) -> None:
        await self.session.close()


async def closed_loop(
    client: Client, *, concurrency: int, requests: int, stream: bool, max_tokens: int
) -> tuple[list[Timed], float]:
    left = requests
    results: list[Timed] = []

    async def one_client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            results.append(await client.send(stream=stream, max_tokens=max_tokens))

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return results, time.perf_counter() - started


async def open_loop(
    client: Client, *, rate: float, seconds: float, stream: bool, max_tokens: int, seed: int = 0
) -> tuple[list[Timed], float]:
    """Requests sent at Poisson arrival times (`rate` per second on average, seeded), whatever is in flight.

    Each request's task is created at its arrival time, as vLLM's `benchmark_serving` does, not all at the start:
    creating a level's 10,000-30,000 waiting tasks at once kept the client's loop busy for its first second, and
    the requests of that second read their answers up to ~0.5 s late (2026-12-07 night)."""
    rng = random.Random(seed)
    arrivals: list[float] = []
    at = 0.0
    while at < seconds:
        arrivals.append(at)
        at += rng.expovariate(rate)

    async def one(late: float) -> Timed:
        timed = await client.send(stream=stream, max_tokens=max_tokens)
        timed.late = late
        return timed

    started = time.perf_counter()
    tasks: list[asyncio.Task[Timed]] = []
    for offset in arrivals:
        wait = started + offset - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(one(time.perf_counter() - started - offset)))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - started


def job_created_at(farm: PrivateFarm, job_ids: list[str]) -> dict[str, float]:
    """job id -> epoch seconds of its row's creation (the farm's SQLite or PostgreSQL database)."""
    database_url = farm.env()["DATABASE_URL"]
    if not database_url.startswith("sqlite:///"):
        import psycopg

        with psycopg.connect(database_url) as conn:
            rows = conn.execute(
                "SELECT id, created_at FROM farm_job WHERE id = ANY(%s)", ([uuid.UUID(j) for j in job_ids],)
            ).fetchall()
        return {str(row[0]): row[1].timestamp() for row in rows}
    with sqlite3.connect(database_url.removeprefix("sqlite:///")) as db:
        rows = db.execute(
            f"SELECT id, created_at FROM farm_job WHERE id IN ({','.join('?' * len(job_ids))})",
            [uuid.UUID(j).hex for j in job_ids],
        ).fetchall()
    return {str(uuid.UUID(row[0])): datetime.fromisoformat(row[1]).replace(tzinfo=UTC).timestamp() for row in rows}


def first_token_in_redis(farm: PrivateFarm, job_ids: list[str]) -> dict[str, float]:
    """job id -> epoch seconds of the first worker entry of its token stream (Redis stream ids are ms timestamps).
    The stream's opening entry (`Restart(1)`, written by the API at intake) and any later restart are skipped: taking
    the first entry, as this did from 81aa0a4 to 2026-12-08, timed the intake's write, not the worker's."""
    import redis

    from farm import stream_format

    client = redis.Redis(port=farm.redis_port)
    with client.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.xrange(f"farm:job:{job_id}:stream", count=8)
        replies = pipe.execute()
    field = stream_format.FIELD.encode()
    firsts = {}
    for job_id, entries in zip(job_ids, replies, strict=True):
        for entry_id, fields in entries:
            if not isinstance(stream_format.decode(fields[field]), stream_format.Restart):
                firsts[job_id] = int(entry_id.split(b"-")[0]) / 1000
                break
    return firsts


def ms(values: list[float], q: float) -> float | None:
    value = percentile(values, q)
    return None if value is None else round(value * 1000, 2)


def seconds_of(results: list[Timed]) -> list[dict[str, Any]]:
    """An open loop's latency second by second (by send time, from the first send), errors left out: whether a
    tail is spread over the run (the load itself) or packed into a few seconds (a pause: a collection, a periodic
    task, the host). Each second carries its epoch time, to line up with the farm's logs."""
    ok = [r for r in results if r.error is None]
    if not ok:
        return []
    origin = min(r.sent for r in ok)
    by_second: dict[int, list[float]] = {}
    for r in ok:
        by_second.setdefault(int(r.sent - origin), []).append(r.done - r.sent)
    return [
        {
            "second": second,
            "at": round(origin + second, 3),
            "requests": len(values),
            "p50_ms": ms(values, 50),
            "p99_ms": ms(values, 99),
        }
        for second, values in sorted(by_second.items())
    ]


def worst_seconds(seconds: list[dict[str, Any]], *, count: int = 5) -> list[dict[str, Any]]:
    """The `count` rows of `seconds_of` with the highest p99 latency, worst first."""
    return sorted(seconds, key=lambda row: row["p99_ms"] or 0.0, reverse=True)[:count]


def open_loop_figures(timed: list[Timed]) -> dict[str, Any]:
    """What an open-loop level adds to a closed-loop one's figures: the client's own lateness and the level's
    latency second by second, with its worst seconds."""
    seconds = seconds_of(timed)
    return {
        "client_late_p99_ms": ms([t.late for t in timed], 99),
        "worst_seconds": worst_seconds(seconds),
        "seconds": seconds,
    }


def cpu_now(farm: PrivateFarm, *, postgres: bool) -> dict[int, tuple[str, float]]:
    """CPU seconds so far of every process a request costs, by pid with its role: the farm's children with their
    descendants (vLLM or not), the bench's own client process, and with `postgres` the machine's PostgreSQL server
    (its postmaster and every backend under it)."""
    roots = {name: child.pid for name, child in farm.children.items()}
    if postgres:
        for process in psutil.process_iter(["name", "ppid"]):
            if process.info["name"] == "postgres" and psutil.Process(process.info["ppid"]).name() != "postgres":
                roots["postgres"] = process.pid
    return {**cpu_snapshot({"bench-client": os.getpid()}, descendants=False), **cpu_snapshot(roots)}


def cpu_per_request(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], requests: int
) -> dict[str, float]:
    """CPU ms per request by role (a worker's vLLM children, if any, count as the worker), and their total."""
    spent: dict[str, float] = {}
    for role, seconds in cpu_delta(before, after).items():
        name = role.split("/")[0]
        spent[name] = spent.get(name, 0.0) + seconds
    figures = {name: round(seconds * 1000 / max(1, requests), 2) for name, seconds in sorted(spent.items())}
    figures["total"] = round(sum(figures.values()), 2)
    return figures


def level_figures(farm: PrivateFarm, results: list[Timed], elapsed: float) -> dict[str, Any]:
    ok = [r for r in results if r.error is None and r.job_id]
    ids = [r.job_id for r in ok if r.job_id]
    created = job_created_at(farm, ids)
    first_token = first_token_in_redis(farm, ids)
    hops: dict[str, list[float]] = {"api": [], "queue": [], "out": []}
    for r in ok:
        c, t = created.get(r.job_id or ""), first_token.get(r.job_id or "")
        if c is None or t is None or r.first_byte is None:
            continue
        hops["api"].append(c - r.sent)
        hops["queue"].append(t - c)
        hops["out"].append(r.first_byte - t)
    latency = [r.done - r.sent for r in ok]
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "first_errors": sorted({r.error for r in results if r.error})[:3],
        "requests_per_s": round(len(ok) / elapsed, 1),
        "latency_p50_ms": ms(latency, 50),
        "latency_p99_ms": ms(latency, 99),
        **{f"{hop}_p50_ms": ms(values, 50) for hop, values in hops.items()},
        **{f"{hop}_p99_ms": ms(values, 99) for hop, values in hops.items()},
    }


async def open_streams(farm: PrivateFarm, client: Client, *, count: int, tokens: int) -> dict[str, Any]:
    """`count` streams at once on the one API process; samples its RSS while they are open."""
    api = psutil.Process(farm.children["api"].pid)
    peak = api.memory_info().rss
    before = peak
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, api.memory_info().rss)
            await asyncio.sleep(0.2)

    sampler = asyncio.create_task(sample())
    started = time.perf_counter()
    results = await asyncio.gather(*(client.send(stream=True, max_tokens=tokens) for _ in range(count)))
    elapsed = time.perf_counter() - started
    done.set()
    await sampler
    errors = [r.error for r in results if r.error]
    return {
        "streams": count,
        "errors": len(errors),
        "first_errors": sorted(set(errors))[:3],
        "elapsed_s": round(elapsed, 1),
        "api_rss_before_mib": round(before / 2**20, 1),
        "api_rss_peak_mib": round(peak / 2**20, 1),
        "latency_p50_s": round(percentile([r.done - r.sent for r in results], 50) or 0, 2),
    }


async def ready_client(farm: PrivateFarm, *, request_timeout: float) -> Client:
    """A client of `farm` once it is ready and has answered one request."""
    while await http_status(f"{farm.base_url}/readyz") != 200:
        farm.check_alive()
        await asyncio.sleep(0.5)
    client = Client(farm.base_url, farm.api_key, farm.model_name, request_timeout=request_timeout)
    while (await client.send(stream=False, max_tokens=1)).error:
        farm.check_alive()
        await asyncio.sleep(0.5)
    return client


async def warm_up(client: Client, args: argparse.Namespace) -> None:
    await closed_loop(client, concurrency=16, requests=100, stream=True, max_tokens=args.output_tokens)
    freeze_startup("bench client")  # the client's own full collections (20-40 ms) must not be in the figures


CONTROL_PLANE_CPU, DATA_PLANE_CPU = 0, 1


def split_cores(farm: PrivateFarm) -> dict[int, list[int]]:
    """Pins the control plane to CPU 0 and the data plane and this client to CPU 1 (see --split-cores); returns
    the PostgreSQL processes' affinities as they were."""
    plane = {"api": CONTROL_PLANE_CPU, "control": CONTROL_PLANE_CPU, "worker": DATA_PLANE_CPU, "redis": DATA_PLANE_CPU}
    for name, child in farm.children.items():
        root = psutil.Process(child.pid)
        for process in [root, *root.children(recursive=True)]:
            process.cpu_affinity([plane[name]])
    psutil.Process().cpu_affinity([DATA_PLANE_CPU])
    saved: dict[int, list[int]] = {}
    for process in psutil.process_iter(["name"]):
        if process.info["name"] == "postgres":
            saved[process.pid] = process.cpu_affinity()
            process.cpu_affinity([CONTROL_PLANE_CPU])  # backends forked later inherit the postmaster's
    return saved


def restore_affinity(saved: dict[int, list[int]]) -> None:
    for process in psutil.process_iter(["name"]):
        if process.info["name"] == "postgres":
            with contextlib.suppress(psutil.Error):
                process.cpu_affinity(saved.get(process.pid) or list(range(psutil.cpu_count())))


def figures_of_level(
    farm: PrivateFarm, args: argparse.Namespace, timed: list[Timed], elapsed: float, cpu_before: dict
) -> dict[str, Any]:
    cpu_ms = cpu_per_request(cpu_before, cpu_now(farm, postgres=bool(args.postgres)), len(timed))
    return {**level_figures(farm, timed, elapsed), "cpu_ms_per_request": cpu_ms}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = ROOT / ".farm" / "bench-null-model"  # the null engine reads no weights; the farm wants a path
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / ".farm-ready").write_text('{"note": "null engine: no weights"}\n')
    home = Path(tempfile.mkdtemp(prefix="farm-control-plane-"))
    drops: list[Callable[[], None]] = []

    def database_env(label: str) -> dict[str, str]:
        if not args.postgres:
            return {}
        url, drop = fresh_database(args.postgres, label)
        drops.append(drop)
        return {"DATABASE_URL": url}

    farm = PrivateFarm(
        home=home,
        model_dir=model_dir,
        engine_args={},
        port=free_port(),
        redis_port=free_port(),
        worker_concurrency=max(args.worker_concurrency, args.open_streams),
        extra_env={"FARM_NULL_ENGINE": "1", "FARM_NULL_ENGINE_TOKEN_INTERVAL_S": "0", **database_env("control_plane")},
    )
    results: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "sweep": [],
        "rates": [],
        "streams": None,
    }
    print(f"starting a private farm in {home} (null engine) ...", flush=True)
    farm.start()
    client: Client | None = None
    saved_affinity: dict[int, list[int]] = {}
    try:
        client = await ready_client(farm, request_timeout=args.request_timeout)
        if args.split_cores:
            saved_affinity = split_cores(farm)
        await warm_up(client, args)
        for concurrency in [int(c) for c in args.concurrency.split(",") if c]:
            for mode in args.modes.split(","):
                requests = args.requests or max(100, 4 * concurrency)
                cpu_before = cpu_now(farm, postgres=bool(args.postgres))
                timed, elapsed = await closed_loop(
                    client,
                    concurrency=concurrency,
                    requests=requests,
                    stream=mode == "stream",
                    max_tokens=args.output_tokens,
                )
                figures = {
                    "concurrency": concurrency,
                    "mode": mode,
                    **figures_of_level(farm, args, timed, elapsed, cpu_before),
                }
                results["sweep"].append(figures)
                print(json.dumps(figures), flush=True)
        for rate in [float(r) for r in args.rates.split(",") if r]:
            for mode in args.modes.split(","):
                cpu_before = cpu_now(farm, postgres=bool(args.postgres))
                timed, elapsed = await open_loop(
                    client, rate=rate, seconds=args.rate_seconds, stream=mode == "stream", max_tokens=args.output_tokens
                )
                figures = {
                    "rate": rate,
                    "mode": mode,
                    **figures_of_level(farm, args, timed, elapsed, cpu_before),
                    **open_loop_figures(timed),
                }
                results["rates"].append(figures)
                print(json.dumps({k: v for k, v in figures.items() if k != "seconds"}), flush=True)
        if args.open_streams:
            restore_affinity(saved_affinity)
            saved_affinity = {}
            await client.close()
            farm.stop()
            farm = PrivateFarm(
                home=Path(tempfile.mkdtemp(prefix="farm-streams-")),
                model_dir=model_dir,
                engine_args={},
                port=free_port(),
                redis_port=free_port(),
                worker_concurrency=max(args.worker_concurrency, args.open_streams),
                extra_env={
                    "FARM_NULL_ENGINE": "1",
                    "FARM_NULL_ENGINE_TOKEN_INTERVAL_S": str(args.token_interval),
                    **database_env("streams"),
                },
            )
            print(
                f"restarting with a {args.token_interval}s token interval for {args.open_streams} open streams",
                flush=True,
            )
            farm.start()
            client = await ready_client(farm, request_timeout=args.request_timeout)
            results["streams"] = await open_streams(farm, client, count=args.open_streams, tokens=args.stream_tokens)
            print(json.dumps(results["streams"]), flush=True)
    finally:
        restore_affinity(saved_affinity)
        if client is not None:
            await client.close()
        farm.stop()
        for drop in drops:
            drop()
    results["database"] = "postgresql" if args.postgres else "sqlite"
    return results


# Issue #8's control-plane bars (this 2-core machine).
BAR_REQUESTS_PER_S = 500.0
BAR_P99_MS = 50.0
BAR_STREAMS = 1000
BAR_STREAMS_RSS_MIB = 1024.0


def _best_within_p99(rows: list[dict[str, Any]], level: str, label: str) -> tuple[float | None, str]:
    """The highest requests/s of an error-free row whose p99 stayed within the bar, and which row that was."""
    if not rows:
        return None, "not run"
    within = [
        r for r in rows if not r["errors"] and r["latency_p99_ms"] is not None and r["latency_p99_ms"] <= BAR_P99_MS
    ]
    if not within:
        return 0.0, f"no level with p99 <= {BAR_P99_MS:g} ms"
    best = max(within, key=lambda r: r["requests_per_s"])
    return best["requests_per_s"], f"{label}={best[level]:g} {best['mode']}, p99 {best['latency_p99_ms']} ms"


def bars(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue #8's bars on this run: the most requests/s a closed-loop level and an open-loop rate sustained with p99
    <= 50 ms, and the open streams' errors and RSS. `passed` is None where the phase did not run (or ran fewer
    streams than the bar)."""
    out = []
    for loop, phase, level, label in (("closed", "sweep", "concurrency", "c"), ("open", "rates", "rate", "rate")):
        value, detail = _best_within_p99(results.get(phase) or [], level, label)
        out.append(
            {
                "bar": f"requests/s with p99 <= {BAR_P99_MS:g} ms, {loop} loop >= {BAR_REQUESTS_PER_S:g}",
                "value": value,
                "detail": detail,
                "passed": None if value is None else value >= BAR_REQUESTS_PER_S,
            }
        )
    streams = results.get("streams") or {}
    passed = None
    if streams.get("streams", 0) >= BAR_STREAMS:
        passed = streams["errors"] == 0 and streams["api_rss_peak_mib"] < BAR_STREAMS_RSS_MIB
    out.append(
        {
            "bar": f"{BAR_STREAMS:,} open streams on one API process: 0 errors, RSS < {BAR_STREAMS_RSS_MIB:g} MiB",
            "value": streams.get("api_rss_peak_mib"),
            "detail": f"{streams['streams']} streams, {streams['errors']} errors" if streams else "not run",
            "passed": passed,
        }
    )
    return out


def table(results: dict[str, Any]) -> str:
    cols = [
        "concurrency",
        "mode",
        "requests_per_s",
        "errors",
        "latency_p50_ms",
        "latency_p99_ms",
        "api_p50_ms",
        "api_p99_ms",
        "queue_p50_ms",
        "queue_p99_ms",
        "out_p50_ms",
        "out_p99_ms",
    ]
    roles = ["api", "control", "worker", "postgres", "redis", "bench-client", "total"]
    lines = ["| " + " | ".join([*cols, "CPU ms/request: " + " / ".join(roles)]) + " |", "|" + "---|" * (len(cols) + 1)]
    for row in results["sweep"]:
        cpu = row.get("cpu_ms_per_request", {})
        cells = [str(row.get(c)) for c in cols] + [" / ".join(str(cpu.get(role, "-")) for role in roles)]
        lines.append("| " + " | ".join(cells) + " |")
    if results.get("rates"):
        rate_cols = [
            "rate",
            "mode",
            "requests_per_s",
            "errors",
            "latency_p50_ms",
            "latency_p99_ms",
            "client_late_p99_ms",
        ]
        lines += [
            "",
            "| " + " | ".join([*rate_cols, "CPU ms/request total"]) + " |",
            "|" + "---|" * (len(rate_cols) + 1),
        ]
        for row in results["rates"]:
            cells = [str(row.get(c)) for c in rate_cols] + [str(row.get("cpu_ms_per_request", {}).get("total"))]
            lines.append("| " + " | ".join(cells) + " |")
        for row in results["rates"]:
            worst = ", ".join(f"s{w['second']} {w['p99_ms']}" for w in row.get("worst_seconds", []))
            lines.append(f"\n{row['rate']}/s {row['mode']}: the seconds with the highest p99 (ms): {worst}")
    if results["streams"]:
        lines += [
            "",
            "| open streams | errors | API RSS before MiB | API RSS peak MiB | wall s |",
            "|---|---|---|---|---|",
            "| {streams} | {errors} | {api_rss_before_mib} | {api_rss_peak_mib} | {elapsed_s} |".format(
                **results["streams"]
            ),
        ]
    if results.get("bars"):
        lines += ["", "| bar | value | where | result |", "|---|---|---|---|"]
    for bar in results.get("bars", []):
        result = {True: "pass", False: "FAIL", None: "n/a"}[bar["passed"]]
        lines.append(f"| {bar['bar']} | {bar['value']} | {bar['detail']} | {result} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.client_loop == "uvloop":
        import uvloop

        results = uvloop.run(run(args))
    else:
        results = asyncio.run(run(args))
    results["machine"] = {"cpus": psutil.cpu_count(), "load_after": list(psutil.getloadavg())}
    results["bars"] = bars(results)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"control-plane-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
