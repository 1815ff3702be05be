"""Cold start: from a worker's start to the first token of a request for its model, and what the time goes to.

    .venv/bin/python -m bench.cold_start                    # the demo model (SmolLM2-135M-Instruct), 2 rounds
    .venv/bin/python -m bench.cold_start --rounds 3 --out cold.json
    .venv/bin/python -m bench.cold_start --lazy --only farm   # request -> first token on a lazy worker
    .venv/bin/python -m bench.cold_start --model-dir .farm/test-models/tiny-llama \\
        --engine-args '{"max_model_len": 1024, "enforce_eager": true}'

Farm arm: a private farm (`bench.private_farm`: API, control worker, embedded Valkey) with no worker. Each round
starts a worker for the model's spec and, at the same moment, a client that asks for a streamed chat completion: the
farm answers 503 with `Retry-After` while no worker serves the model, and the client asks again every 0.1 s. The time
from the worker's start to that client's first token is the farm's cold start. The worker's log splits it into
phases (seconds from the worker's start):

    process up      first log line (interpreter, farm imports, hardware probe)
    engine start    the worker starts loading the spec's engine
    engine core up  vLLM's engine-core process logs its first line (its own interpreter, torch and vLLM imports)
    weights loaded  vLLM's "Loading weights took" line
    engine loaded   vLLM's `AsyncLLM` is ready (after memory profiling, KV cache allocation and warm-up)
    consumer ready  Celery consumes the spec's queue and the worker advertises itself
    first token     the waiting client's first token

With --lazy the worker is started first with the spec as `--lazy-spec` (advertised, not loaded) and the clock starts
when the client sends its request: the time from a request for an unloaded model to its first token (marks before the
request, such as process up, are left out).

Direct arm (the floor): a fresh process loads vLLM's `AsyncLLM` with the same engine defaults and args
(`bench.direct_arm`) and streams one request; its time from process start to first token is the engine's own cold
start, which a farm worker can only add to. vLLM's log lines have 1 s resolution; the other marks have 1 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL_DIR = ROOT / "models" / "smollm2-135m-instruct"  # where `make run` prepares it (FARM_MODEL_DIR)
DEMO_ENGINE_ARGS = {"max_model_len": 2048, "dtype": "float32"}

FARM_LINE = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3}) ")
VLLM_LINE = re.compile(r"^\((\w+) pid=\d+\) \w+ (\d{2}-\d{2} \d{2}:\d{2}:\d{2}) ")
# phase -> (which log lines, a regular expression the line must match)
MARKS: dict[str, tuple[str, str]] = {
    "process_up": ("farm", r""),
    "engine_start": ("farm", r"gpu_workers(\.engine_pool)? \[\S+\] loading "),
    "engine_core_up": ("vllm-core", r""),
    "weights_loaded": ("vllm", r"Loading weights took"),
    "engine_loaded": ("farm", r"engine for .* loaded in"),
    "consumer_ready": ("farm", r"@\S+ ready\.$"),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cold_start", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=DEMO_MODEL_DIR,
        help="model directory (default: the demo model, prepared if missing)",
    )
    parser.add_argument(
        "--engine-args",
        default=json.dumps(DEMO_ENGINE_ARGS),
        help="vLLM engine args of the spec, JSON (default: %(default)s)",
    )
    parser.add_argument(
        "--kv-cache-gib",
        default="2",
        help="VLLM_CPU_KVCACHE_SPACE for both arms (default %(default)s, the farm worker's)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="cold starts per arm (default %(default)s)")
    parser.add_argument("--only", choices=["direct", "farm"], help="run one arm only")
    parser.add_argument(
        "--lazy",
        action="store_true",
        help="farm arm: the worker is up with the spec as --lazy-spec before the request; the clock "
        "starts at the request (a request for an unloaded model -> its first token)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="write the results as JSON here (default: bench/results/cold-start-<UTC timestamp>.json)",
    )
    return parser.parse_args(argv)


# --- direct arm -------------------------------------------------------------------------------------------------------


def direct_round(args: argparse.Namespace) -> dict[str, float]:
    """Process start -> engine ready -> first token of one streamed request, in a fresh `bench.direct_arm`."""
    log = Path(tempfile.mkstemp(prefix="farm-bench-cold-direct-", suffix=".log")[1])
    started = time.monotonic()
    with log.open("w") as stderr:
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.direct_arm",
                "--model-dir",
                str(args.model_dir),
                "--engine-args",
                args.engine_args,
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": args.kv_cache_gib},
        )
    try:
        line = child.stdout.readline()
        if not line:
            raise RuntimeError(f"the direct arm exited ({child.wait()}); its log: {log}")
        ready = json.loads(line)
        ready_s = time.monotonic() - started
        command = {"op": "run", "prompts": ["Hello"], "concurrency": 1, "max_tokens": 8, "temperature": 0.0}
        child.stdin.write(json.dumps(command) + "\n")
        child.stdin.flush()
        batch = json.loads(child.stdout.readline())
        (sample,) = batch["samples"]
        child.stdin.write(json.dumps({"op": "quit"}) + "\n")
        child.stdin.flush()
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    log.unlink()
    return {"engine_loaded": ready_s, "engine_load_s": ready["load_s"], "first_token": ready_s + sample["ttft_s"]}


# --- farm arm ---------------------------------------------------------------------------------------------------------


def waiting_client(farm: Any, started: float, deadline_s: float, result: dict[str, Any]) -> None:
    """Asks for a streamed completion until one is served (503 while no worker serves); records its first token."""
    import httpx

    body = {
        "model": farm.model_name,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {farm.api_key}"}
    attempts = 0
    with httpx.Client(timeout=120) as client:
        while time.monotonic() - started < deadline_s:
            attempts += 1
            with client.stream("POST", f"{farm.base_url}/v1/chat/completions", json=body, headers=headers) as reply:
                if reply.status_code == 503:
                    time.sleep(0.1)
                    continue
                reply.raise_for_status()
                for line in reply.iter_lines():
                    if line.startswith("data: {") and '"content":' in line and '"content":""' not in line:
                        result["first_token"] = time.monotonic() - started
                        result["attempts"] = attempts
                        return
                raise RuntimeError("the stream ended without a token")
    result["error"] = f"no token within {deadline_s}s"


def log_marks(path: Path, spawned_at: float) -> dict[str, float]:
    """Seconds from the worker's start (`spawned_at`, a time.time()) to each phase mark found in its log."""
    year = datetime.fromtimestamp(spawned_at).year
    marks: dict[str, float] = {}
    for line in path.read_text(errors="replace").splitlines():
        farm_line, vllm_line = FARM_LINE.match(line), VLLM_LINE.match(line)
        if farm_line:
            kind, at = "farm", datetime.strptime(farm_line.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        elif vllm_line:
            kind = "vllm-core" if vllm_line.group(1) == "EngineCore" else "vllm"
            at = datetime.strptime(f"{year}-{vllm_line.group(2)}", "%Y-%m-%d %H:%M:%S").timestamp()
        else:
            continue
        for name, (source, pattern) in MARKS.items():
            if name in marks:
                continue
            if (source == kind or (source == "vllm" and kind == "vllm-core")) and re.search(pattern, line):
                marks[name] = round(at - spawned_at, 3)
    return marks


def vllm_durations(path: Path) -> dict[str, float]:
    """What vLLM itself reports: weights loading and `init engine` (profile, KV cache, warm-up), in seconds."""
    text = path.read_text(errors="replace")
    found = {}
    for name, pattern in (
        ("weights_s", r"Loading weights took ([\d.]+) seconds"),
        ("init_engine_s", r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+)"),
    ):
        match = re.search(pattern, text)
        if match:
            found[name] = float(match.group(1))
    return found


def farm_rounds(args: argparse.Namespace) -> list[dict[str, Any]]:
    import httpx

    from bench.arms import free_port
    from bench.private_farm import PrivateFarm

    home = Path(tempfile.mkdtemp(prefix="farm-bench-cold-"))
    farm = PrivateFarm(
        home=home,
        model_dir=args.model_dir,
        engine_args=json.loads(args.engine_args),
        port=free_port(),
        redis_port=free_port(),
        worker_concurrency=16,
        extra_env={"FARM_CPU_KVCACHE_GIB": args.kv_cache_gib},
    )
    rounds = []
    try:
        farm.start(worker=False)
        deadline = time.monotonic() + 120
        while True:
            farm.check_alive()
            try:
                if httpx.get(f"{farm.base_url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the API is not ready; logs in {farm.log_dir}")
            time.sleep(0.2)
        for index in range(args.rounds):
            name = f"worker-{index}"
            result: dict[str, Any] = {}
            if args.lazy:  # up and advertising the spec, nothing loaded: the request is what starts the load
                farm.start_worker(name, lazy=True)
                wait_for_log(farm, name, MARKS["consumer_ready"][1], timeout_s=300)
                time.sleep(1.5)  # a heartbeat and the API's registry snapshot (1 s) see the worker
            spawned_at, started = time.time(), time.monotonic()
            if not args.lazy:
                farm.start_worker(name)
            client = threading.Thread(target=waiting_client, args=(farm, started, 600, result))
            client.start()
            client.join()
            log = farm.log_dir / f"{name}.log"
            time.sleep(0.5)  # the worker's last lines reach its log
            marks = {mark: at for mark, at in log_marks(log, spawned_at).items() if at >= 0 or not args.lazy}
            rounds.append({**marks, **result, **vllm_durations(log), "log": str(log)})
            print(
                f"farm round {index + 1}: first token after {result.get('first_token', float('nan')):.1f}s",
                file=sys.stderr,
            )
            farm.stop_child(name)
            time.sleep(2)  # its registry entry expires; the next round starts cold
    finally:
        farm.stop()
    return rounds


def wait_for_log(farm: Any, name: str, pattern: str, timeout_s: float) -> None:
    log = farm.log_dir / f"{name}.log"
    deadline = time.monotonic() + timeout_s
    while not (log.exists() and re.search(pattern, log.read_text(errors="replace"), re.MULTILINE)):
        farm.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} did not log {pattern!r} within {timeout_s}s; see {log}")
        time.sleep(0.2)


# --- report -----------------------------------------------------------------------------------------------------------


def medians(rounds: list[dict[str, Any]]) -> dict[str, float]:
    keys = [key for key in rounds[0] if all(isinstance(r.get(key), int | float) for r in rounds)]
    return {key: round(statistics.median(r[key] for r in rounds), 2) for key in keys}


def table(results: dict[str, Any]) -> str:
    farm, direct = results.get("farm", {}).get("median", {}), results.get("direct", {}).get("median", {})
    rows = [f"{'seconds from process start':<28}{'farm':>8}{'direct':>8}"]
    for name in [*MARKS, "first_token"]:
        rows.append(f"{name:<28}{_cell(farm.get(name)):>8}{_cell(direct.get(name)):>8}")
    for name in ("weights_s", "init_engine_s", "engine_load_s"):
        if name in farm or name in direct:
            rows.append(f"{'  ' + name:<28}{_cell(farm.get(name)):>8}{_cell(direct.get(name)):>8}")
    if farm.get("first_token") and direct.get("first_token"):
        rows.append(f"{'farm - direct (first token)':<28}{farm['first_token'] - direct['first_token']:>8.2f}")
    return "\n".join(rows)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.model_dir = args.model_dir.resolve()
    if args.model_dir == DEMO_MODEL_DIR and not DEMO_MODEL_DIR.exists():
        from gpu_workers.model_store import prepare_demo_model

        prepare_demo_model(DEMO_MODEL_DIR.parent)
    results: dict[str, Any] = {
        "loadavg_at_start": list(os.getloadavg()),
        "model": str(args.model_dir),
        "engine_args": json.loads(args.engine_args),
        "rounds": args.rounds,
        "lazy": args.lazy,
    }
    if args.only != "farm":
        direct = []
        for index in range(args.rounds):
            direct.append(direct_round(args))
            print(f"direct round {index + 1}: first token after {direct[-1]['first_token']:.1f}s", file=sys.stderr)
        results["direct"] = {"rounds": direct, "median": medians(direct)}
    if args.only != "direct":
        farm = farm_rounds(args)
        results["farm"] = {"rounds": farm, "median": medians(farm)}
    print(table(results))
    out = args.out or ROOT / "bench" / "results" / f"cold-start-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
