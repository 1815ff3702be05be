"""Routing benchmark: how long one routing decision takes with N workers in the registry.

Phases:
  decide   the per-request decision the API makes (`farm.routing.spec_states` + `route_request` over the
           process' registry snapshot): N workers serving --models models x --specs-per-model specs, random load,
           some draining, some stale, some specs backed off. Reports p50/p99/max in microseconds.
  refresh  (--redis URL) the registry refresh each API process does once a second (`farm.registry`: SMEMBERS + MGET
           of N heartbeat entries + JSON parsing), against a real Redis filled with N entries written the way
           workers write them (wall and CPU time); and `farm.inference.spec_choose` end to end with that Redis for
           --seconds, the snapshot refreshed in the background as it expires.

Examples:
  .venv/bin/python -m bench.routing                                  # 1,000 workers, decision only
  .venv/bin/python -m bench.routing --workers 1000 --redis redis://127.0.0.1:6379/7
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Fleet:
    specs_by_model: dict[str, list[tuple[str, int]]]
    entries: list[dict[str, Any]]  # heartbeat entries as workers write them


def make_fleet(*, workers: int, models: int, specs_per_model: int, seed: int, now: float) -> Fleet:
    rng = random.Random(seed)
    specs_by_model = {
        f"model-{m}": [
            (f"model-{m}-spec-{s}", 0 if s == specs_per_model - 1 else rng.choice((10, 50, 100)))
            for s in range(specs_per_model)
        ]
        for m in range(models)
    }
    all_specs = [name for specs in specs_by_model.values() for name, _ in specs]
    entries = []
    for index in range(workers):
        capacity = rng.choice((8, 32, 128))
        entries.append(
            {
                "worker_id": f"bench-worker-{index}",
                "specs": [rng.choice(all_specs)],
                "heartbeat_s": 5.0,
                "ts": now - (60.0 if rng.random() < 0.02 else rng.uniform(0, 5)),  # 2% missed their heartbeats
                "status": "draining" if rng.random() < 0.03 else "ready",
                "running_jobs": [],
                "load": {"running": rng.randint(0, capacity), "capacity": capacity, "tokens_per_s": 100.0},
                "hardware": {"kind": "gpu", "gpus": [{"name": "NVIDIA H100 80GB HBM3", "memory_total_mib": 81559}]},
            }
        )
    return Fleet(specs_by_model=specs_by_model, entries=entries)


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_us": ordered[len(ordered) // 2] * 1e6,
        "p99_us": ordered[int(len(ordered) * 0.99)] * 1e6,
        "max_us": ordered[-1] * 1e6,
        "mean_us": statistics.fmean(ordered) * 1e6,
    }


def bench_decide(fleet: Fleet, *, decisions: int, seed: int, now: float) -> dict[str, float]:
    import orjson

    from farm.registry import _parse, workers_by_spec
    from farm.routing import route_request, spec_states

    index = workers_by_spec(_parse([orjson.dumps(entry) for entry in fleet.entries]))
    rng = random.Random(seed)
    models = list(fleet.specs_by_model)
    backoffs = {name: now + 30 for specs in fleet.specs_by_model.values() for name, _ in specs if rng.random() < 0.05}
    samples = []
    for _ in range(decisions):
        specs = fleet.specs_by_model[rng.choice(models)]
        started = time.perf_counter()
        # What `farm.registry.live_workers_serving` returns from its per-second snapshot.
        serving = {w.worker_id: w for name, _ in specs for w in index.get(name, ())}.values()
        states = spec_states(specs, serving, now=now, backoffs=backoffs)
        route_request(states, rng, now=now)
        samples.append(time.perf_counter() - started)
    return percentiles(samples)


def bench_refresh(fleet: Fleet, *, redis_url: str, rounds: int, seconds: float) -> dict[str, dict[str, float]]:
    import os

    os.environ["REDIS_URL"] = redis_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings.django")
    import django

    django.setup()
    import orjson
    import redis

    from farm import redis_keys, registry
    from farm.catalog import ModelEntry, SpecEntry
    from farm.errors import FarmError
    from farm.inference import spec_choose

    client = redis.Redis.from_url(redis_url)
    ids = [entry["worker_id"] for entry in fleet.entries]
    with client.pipeline(transaction=False) as pipe:
        for entry in fleet.entries:
            pipe.set(redis_keys.worker(entry["worker_id"]), orjson.dumps({**entry, "ts": time.time()}), ex=600)
        pipe.sadd(redis_keys.WORKERS_SET, *ids)
        pipe.execute()
    model_entries = [
        ModelEntry(
            id=i,
            name=name,
            owned_by="bench",
            created=0,
            specs=tuple(
                SpecEntry(id=j, name=s, engine="vllm", weight=w, min_replicas=0) for j, (s, w) in enumerate(specs)
            ),
        )
        for i, (name, specs) in enumerate(fleet.specs_by_model.items())
    ]

    async def run() -> dict[str, dict[str, float]]:
        refresh, choose = [], []
        for _ in range(rounds):
            registry.registry_invalidate()
            started = time.perf_counter()
            await registry.live_workers()
            refresh.append(time.perf_counter() - started)
        rng = random.Random(1)
        cpu_started = time.process_time()
        for _ in range(rounds):
            registry.registry_invalidate()
            await registry.live_workers()
        refresh_cpu = (time.process_time() - cpu_started) / rounds
        # Requests spread over a few seconds: the snapshot expires and is re-read in the background meanwhile.
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            model = rng.choice(model_entries)
            started = time.perf_counter()
            with contextlib.suppress(FarmError):  # a model with no live replica answers 503: timed all the same
                await spec_choose(model)
            choose.append(time.perf_counter() - started)
            await asyncio.sleep(0.0005)  # other requests' turn on the event loop
        return {
            "registry_refresh": percentiles(refresh),
            "registry_refresh_cpu": {"mean_us": refresh_cpu * 1e6},
            "spec_choose": percentiles(choose),
        }

    try:
        return asyncio.run(run())
    finally:
        with client.pipeline(transaction=False) as pipe:
            pipe.delete(*[redis_keys.worker(i) for i in ids])
            pipe.srem(redis_keys.WORKERS_SET, *ids)
            pipe.execute()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.routing", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=1000, help="workers in the registry (default %(default)s)")
    parser.add_argument("--models", type=int, default=50, help="public model names (default %(default)s)")
    parser.add_argument(
        "--specs-per-model",
        type=int,
        default=3,
        help="specs per model, the last one a weight-0 standby (default %(default)s)",
    )
    parser.add_argument("--decisions", type=int, default=20000, help="decisions timed (default %(default)s)")
    parser.add_argument(
        "--redis",
        metavar="URL",
        help="also time the registry refresh against this Redis (its "
        "registry keys are written and removed again; use a database of its own)",
    )
    parser.add_argument("--rounds", type=int, default=200, help="registry refreshes timed (default %(default)s)")
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="how long spec_choose is timed against Redis (default %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    now = time.time()
    fleet = make_fleet(
        workers=args.workers, models=args.models, specs_per_model=args.specs_per_model, seed=args.seed, now=now
    )
    results = {"decide": bench_decide(fleet, decisions=args.decisions, seed=args.seed, now=now)}
    if args.redis:
        results.update(bench_refresh(fleet, redis_url=args.redis, rounds=args.rounds, seconds=args.seconds))
    print(f"routing with {args.workers} workers, {args.models} models x {args.specs_per_model} specs:")
    for phase, figures in results.items():
        print(f"  {phase:20s} " + "  ".join(f"{k} {v:9.1f}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
