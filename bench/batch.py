"""Batch throughput: the farm's `/v1/batches` against the direct engine, offline, on the same model and lines.

    .venv/bin/python -m bench.batch                       # 200 lines x 128 tokens on the tiny test model
    .venv/bin/python -m bench.batch --lines 200 --max-tokens 256 --out batch.json

Direct arm (the ceiling): a child process loads vLLM's offline `LLM` with the farm worker's engine defaults and the
spec's engine args, and runs every line at once through `LLM.chat` (one offline batch, vLLM schedules it).
Farm arm: a private farm (`bench.private_farm`: its own database, Valkey, control worker, API, one worker with
`--worker-concurrency` slots); the `openai` SDK uploads the lines, creates the batch and polls it until it completes;
the time is from `batches.create` to `completed` as the SDK sees it (upload excluded; it is reported apart).

Every line uses `ignore_eos` and greedy decoding, so both arms generate exactly `lines x max_tokens` tokens.
Reported per arm: wall seconds, lines/s, output tokens/s; and farm/direct, the bar being >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL_DIR = ROOT / ".farm" / "test-models" / "tiny-llama"
# The tiny model as the tests serve it (tests/conftest.py): eager mode, a short context.
TINY_ENGINE_ARGS = {"max_model_len": 1024, "enforce_eager": True}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.batch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=TINY_MODEL_DIR,
        help="model directory (default: the tiny test model, built if missing)",
    )
    parser.add_argument(
        "--engine-args",
        default=json.dumps(TINY_ENGINE_ARGS),
        help="vLLM engine args of the spec, JSON (default: %(default)s)",
    )
    parser.add_argument("--lines", type=int, default=200, help="request lines in the batch (default %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per line (default %(default)s)")
    parser.add_argument(
        "--worker-concurrency",
        type=int,
        default=256,
        help="farm worker slots (default %(default)s: every line can be in the engine at once, as in the direct arm)",
    )
    parser.add_argument("--batch-window", type=int, default=256, help="FARM_BATCH_WINDOW of the farm")
    parser.add_argument(
        "--kv-cache-gib",
        default="2",
        help="VLLM_CPU_KVCACHE_SPACE for both arms (default %(default)s, the farm worker's)",
    )
    parser.add_argument(
        "--postgres",
        metavar="URL",
        help="run the farm on a fresh database of this PostgreSQL server (e.g. "
        "postgres://postgres@127.0.0.1:5432/postgres), created and dropped by the bench; default: SQLite "
        "(as `make run`)",
    )
    parser.add_argument("--only", choices=["direct", "farm"], help="run one arm only")
    parser.add_argument("--out", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--direct-child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def batch_lines(count: int, max_tokens: int, model: str) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"line-{i:05d}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": model,
                "messages": [{"role": "user", "content": f"Write a story about the number {i}."}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            },
        }
        for i in range(count)
    ]


# --- direct arm (child process: the engine's memory goes away with it) -----------------------------------------------


def direct_child(args: argparse.Namespace) -> None:
    """Runs in the child: loads the engine, runs the lines once offline, prints one JSON result line."""
    from vllm import LLM, SamplingParams

    from bench.direct_arm import FARM_ENGINE_DEFAULTS

    lines = batch_lines(args.lines, args.max_tokens, args.model_dir.name)
    started = time.monotonic()
    llm = LLM(model=str(args.model_dir), **{**FARM_ENGINE_DEFAULTS, **json.loads(args.engine_args)})
    load_s = time.monotonic() - started
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    conversations = [line["body"]["messages"] for line in lines]
    llm.chat(conversations[:2], params, use_tqdm=False)  # warm-up, as the farm's worker has served before
    cpu_before = tree_cpu_seconds(os.getpid())
    started = time.monotonic()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    wall_s = time.monotonic() - started
    cpu_s = round(tree_cpu_seconds(os.getpid()) - cpu_before, 2)
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    result = {
        "load_s": load_s,
        "wall_s": wall_s,
        "lines": len(outputs),
        "output_tokens": tokens,
        "cpu_s": {"engine": cpu_s},
    }
    print("RESULT " + json.dumps(result), flush=True)


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) a process and its live descendants have used."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def run_direct(args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "bench.batch",
        "--direct-child",
        "--model-dir",
        str(args.model_dir),
        "--engine-args",
        args.engine_args,
        "--lines",
        str(args.lines),
        "--max-tokens",
        str(args.max_tokens),
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": args.kv_cache_gib}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False, env=env)
    result = next((line for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
    if done.returncode != 0 or result is None:
        raise RuntimeError(f"direct arm failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(result.removeprefix("RESULT "))


# --- farm arm -------------------------------------------------------------------------------------------------------


def wait(predicate, *, timeout: float, what: str, farm: Any) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        farm.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready within {timeout}s; logs in {farm.log_dir}")
        time.sleep(0.5)


def cpu_seconds(farm: Any) -> dict[str, float]:
    """CPU seconds (user + system) each farm process has used so far, its descendants (vLLM engine) included."""
    import psutil

    spent: dict[str, float] = {}
    for name, child in farm.children.items():
        try:
            spent[name] = tree_cpu_seconds(child.pid)
        except psutil.NoSuchProcess:
            spent[name] = 0.0
    return spent


def run_farm(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    import openai

    from bench.arms import free_port
    from bench.private_farm import PrivateFarm, fresh_database

    home = Path(tempfile.mkdtemp(prefix="farm-bench-batch-"))
    drop_database = None
    extra_env = {"FARM_BATCH_WINDOW": str(args.batch_window), "VLLM_CPU_KVCACHE_SPACE": args.kv_cache_gib}
    if args.postgres:
        extra_env["DATABASE_URL"], drop_database = fresh_database(args.postgres, "batch")
    farm = PrivateFarm(
        home=home,
        model_dir=args.model_dir,
        engine_args=json.loads(args.engine_args),
        port=free_port(),
        redis_port=free_port(),
        worker_concurrency=args.worker_concurrency,
        extra_env=extra_env,
    )
    try:
        farm.start()
        client = openai.OpenAI(base_url=f"{farm.base_url}/v1", api_key=farm.api_key, max_retries=5, timeout=120)

        def ready() -> bool:
            try:
                return httpx.get(f"{farm.base_url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        def served() -> bool:  # a real request answers (no 503: a worker serves the spec)
            try:
                client.chat.completions.create(
                    model=farm.model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=2
                )
                return True
            except openai.APIStatusError as exc:
                if exc.status_code != 503:
                    raise
                return False

        wait(ready, timeout=120, what="the API", farm=farm)
        wait(served, timeout=600, what="the worker", farm=farm)
        content = b"".join(
            json.dumps(line).encode() + b"\n" for line in batch_lines(args.lines, args.max_tokens, farm.model_name)
        )
        started = time.monotonic()
        file = client.files.create(file=("bench.jsonl", content), purpose="batch")
        upload_s = time.monotonic() - started
        cpu_before = cpu_seconds(farm)
        started = time.monotonic()
        batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
        while batch.status not in ("completed", "failed", "cancelled", "expired"):
            # Polls often enough to time the end within ~2 % but not so often that the API's answers steal the
            # engine's CPU on a long run (every 0.1 s cost the API 5.5 CPU-s over a 66 s run; the direct arm polls
            # nothing).
            time.sleep(min(1.0, max(0.1, (time.monotonic() - started) / 50)))
            batch = client.batches.retrieve(batch.id)
        wall_s = time.monotonic() - started
        cpu_after = cpu_seconds(farm)
        if batch.status != "completed" or batch.request_counts.failed:
            raise RuntimeError(f"batch ended {batch.status}: {batch}")
        return {
            "timeline_s": line_job_timeline(farm, batch.id),
            "wall_s": wall_s,
            "upload_s": upload_s,
            "lines": batch.request_counts.completed,
            "output_tokens": batch.usage.output_tokens,
            "server_s": batch.completed_at - batch.created_at,
            "logs": str(farm.log_dir),
            "database": "postgresql" if args.postgres else "sqlite",
            "cpu_s": {name: round(cpu_after.get(name, 0.0) - cpu_before.get(name, 0.0), 2) for name in cpu_after},
        }
    finally:
        farm.stop()
        if drop_database is not None:
            drop_database()


def line_job_timeline(farm: Any, batch_id: str) -> dict[str, float]:
    """When the batch's line jobs were created, started and finished, in seconds after the batch was created
    (first / median / last): where the farm's time went (dispatch, start-up of the lines, generation, collection)."""
    import statistics
    from datetime import datetime

    query = (
        "SELECT j.created_at, j.started_at, j.finished_at FROM farm_job j JOIN farm_batchline l ON l.job_id = j.id "
        "WHERE l.batch_id = %s"
    )
    database_url = farm.env()["DATABASE_URL"]
    if database_url.startswith("sqlite:///"):
        import sqlite3

        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as conn:
            rows = conn.execute(query.replace("%s", "?"), (batch_id,)).fetchall()
            (batch_created,) = conn.execute("SELECT created_at FROM farm_batch WHERE id = ?", (batch_id,)).fetchone()
    else:
        import psycopg

        with psycopg.connect(database_url) as conn:
            rows = conn.execute(query, (batch_id,)).fetchall()
            (batch_created,) = conn.execute("SELECT created_at FROM farm_batch WHERE id = %s", (batch_id,)).fetchone()

    def stamp(value: Any) -> float:
        return (value if isinstance(value, datetime) else datetime.fromisoformat(str(value))).timestamp()

    origin = stamp(batch_created)
    timeline: dict[str, float] = {}
    for index, name in enumerate(("created", "started", "finished")):
        seconds = sorted(stamp(row[index]) - origin for row in rows if row[index] is not None)
        if seconds:
            timeline |= {
                f"{name}_first": seconds[0],
                f"{name}_median": statistics.median(seconds),
                f"{name}_last": seconds[-1],
            }
    return {key: round(value, 3) for key, value in timeline.items()}


def rates(result: dict[str, Any]) -> dict[str, Any]:
    return {
        **result,
        "lines_per_s": result["lines"] / result["wall_s"],
        "output_tokens_per_s": result["output_tokens"] / result["wall_s"],
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.model_dir = args.model_dir.resolve()  # the farm's children resolve it against another directory
    if args.direct_child:
        direct_child(args)
        return
    if args.model_dir == TINY_MODEL_DIR and not TINY_MODEL_DIR.exists():
        from gpu_workers.model_store import build_tiny_model

        build_tiny_model(TINY_MODEL_DIR)
    results: dict[str, Any] = {
        "loadavg_at_start": list(os.getloadavg()),
        "lines": args.lines,
        "max_tokens": args.max_tokens,
        "model": str(args.model_dir),
        "engine_args": json.loads(args.engine_args),
        "worker_concurrency": args.worker_concurrency,
    }
    if args.only in (None, "direct"):
        results["direct"] = rates(run_direct(args))
        direct = results["direct"]
        print(
            f"direct: {direct['wall_s']:.2f}s, {direct['lines_per_s']:.1f} lines/s, "
            f"{direct['output_tokens_per_s']:.0f} output tokens/s; CPU seconds: {direct['cpu_s']}",
            flush=True,
        )
    if args.only in (None, "farm"):
        results["farm"] = rates(run_farm(args))
        farm = results["farm"]
        print(
            f"farm:   {farm['wall_s']:.2f}s, {farm['lines_per_s']:.1f} lines/s, "
            f"{farm['output_tokens_per_s']:.0f} output tokens/s (upload {farm['upload_s']:.2f}s); "
            f"CPU seconds by process: {farm['cpu_s']}\n"
            f"        line jobs, s after the batch was created: {farm['timeline_s']}",
            flush=True,
        )
    if "direct" in results and "farm" in results:
        results["ratio"] = results["farm"]["output_tokens_per_s"] / results["direct"]["output_tokens_per_s"]
        print(f"farm / direct = {results['ratio']:.3f} (bar: >= 0.9)", flush=True)
    results["loadavg_at_end"] = list(os.getloadavg())
    print(f"load average at start {results['loadavg_at_start']}, at end {results['loadavg_at_end']}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
