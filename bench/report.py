"""Figures of `bench.throughput`: per-batch statistics, per-arm summaries, farm-vs-reference comparisons, the table."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from bench.loadgen import Batch

FARM, SERVE, DIRECT = "farm", "vllm-serve", "direct"
TWIN = "-b"  # an arm's second copy in an A/A run: `vllm-serve-b` against `vllm-serve`
ARM_ORDER = (DIRECT, DIRECT + TWIN, SERVE, SERVE + TWIN, FARM, FARM + TWIN)

# The bars: (what, concurrency: "highest" | "lowest" | a level, comparison key, operator, threshold). The backbone
# issue's hold at the highest and lowest levels measured; the benchmark issue's (#8) at concurrency 64.
BARS: list[tuple[str, str | int, str, str, float]] = [
    ("farm/direct output tok/s at the highest concurrency >= 0.85", "highest", "farm/direct", ">=", 0.85),
    ("farm/vllm-serve output tok/s at the highest concurrency >= 0.95", "highest", "farm/vllm-serve", ">=", 0.95),
    ("farm/vllm-serve output tok/s at concurrency 64 >= 1.0 (#8)", 64, "farm/vllm-serve", ">=", 1.0),
    ("farm/direct output tok/s at concurrency 64 >= 0.95 (#8)", 64, "farm/direct", ">=", 0.95),
    ("added TTFT p50 vs vllm-serve at the lowest level <= 25 ms", "lowest", "added_ttft_p50_ms_vs_serve", "<=", 25),
    ("added TTFT p50 vs direct at the lowest level <= 25 ms", "lowest", "added_ttft_p50_ms_vs_direct", "<=", 25),
]


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ms(value: float | None) -> float | None:
    return None if value is None else value * 1000.0


def batch_stats(batch: Batch) -> dict[str, Any]:
    """Output tokens/s over the batch's wall time (first send to last end), and its request figures."""
    ok = [s for s in batch.samples if s.error is None]
    tokens = sum(s.output_tokens for s in ok)
    tpots = [
        (s.latency_s - s.ttft_s) / (s.output_tokens - 1) for s in ok if s.ttft_s is not None and s.output_tokens > 1
    ]
    return {
        "requests": len(batch.samples),
        "errors": len(batch.samples) - len(ok),
        "first_errors": sorted({s.error for s in batch.samples if s.error})[:3],
        "elapsed_s": batch.elapsed_s,
        "output_tokens": tokens,
        "output_tok_per_s": tokens / batch.elapsed_s if batch.elapsed_s > 0 else 0.0,
        "requests_per_s": len(ok) / batch.elapsed_s if batch.elapsed_s > 0 else 0.0,
        "prompt_tokens_median": statistics.median([s.prompt_tokens for s in ok]) if ok else None,
        "output_tokens_min": min((s.output_tokens for s in ok), default=None),
        "ttft_p50_ms": ms(percentile([s.ttft_s for s in ok if s.ttft_s is not None], 50)),
        "tpot_p50_ms": ms(percentile(tpots, 50)),
    }


def arm_summary(batches: Iterable[Batch]) -> dict[str, Any]:
    """One arm at one concurrency over every round: median throughput, pooled request percentiles."""
    batches = list(batches)
    per_round = [batch_stats(b)["output_tok_per_s"] for b in batches]
    ok = [s for b in batches for s in b.samples if s.error is None]
    ttfts = [s.ttft_s for s in ok if s.ttft_s is not None]
    latencies = [s.latency_s for s in ok]
    tpots = [
        (s.latency_s - s.ttft_s) / (s.output_tokens - 1) for s in ok if s.ttft_s is not None and s.output_tokens > 1
    ]
    return {
        "rounds": len(batches),
        "output_tok_per_s_median": statistics.median(per_round) if per_round else None,
        "output_tok_per_s_rounds": per_round,
        "requests": sum(len(b.samples) for b in batches),
        "errors": sum(1 for b in batches for s in b.samples if s.error is not None),
        "ttft_p50_ms": ms(percentile(ttfts, 50)),
        "ttft_p99_ms": ms(percentile(ttfts, 99)),
        "latency_p50_ms": ms(percentile(latencies, 50)),
        "latency_p99_ms": ms(percentile(latencies, 99)),
        "tpot_p50_ms": ms(percentile(tpots, 50)),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def paired_ratios(a: dict[str, Any], b: dict[str, Any]) -> list[float] | None:
    """Round by round, `a`'s throughput over `b`'s (interleaved rounds run both arms back to back, so each pair saw
    the same machine); None unless both ran the same rounds."""
    rounds_a, rounds_b = a.get("output_tok_per_s_rounds") or [], b.get("output_tok_per_s_rounds") or []
    if not rounds_a or len(rounds_a) != len(rounds_b) or not all(rounds_b):
        return None
    return [x / y for x, y in zip(rounds_a, rounds_b, strict=True)]


def instance_means(rounds: list[float] | None, instances: int) -> list[float] | None:
    """The paired ratios' mean per instance (the rounds split in order into `instances` equal runs)."""
    if not rounds or instances < 2 or len(rounds) % instances:
        return None
    size = len(rounds) // instances
    return [statistics.fmean(rounds[i * size : (i + 1) * size]) for i in range(instances)]


def reference(summary: dict[str, dict[int, dict[str, Any]]], name: str, c: int) -> tuple[dict[str, Any], bool]:
    """Arm `name`'s figures at concurrency `c`; with its twin in the run (same rounds), the two pooled: each round's
    throughput is the mean of the two instances', which halves the variance a single start of the reference brings
    into every ratio (its TTFT figures stay the arm's own). Returns the figures and whether they are pooled."""
    one = summary.get(name, {}).get(c, {})
    twin = summary.get(name + TWIN, {}).get(c, {})
    a, b = one.get("output_tok_per_s_rounds") or [], twin.get("output_tok_per_s_rounds") or []
    if not a or len(a) != len(b):
        return one, False
    rounds = [(x + y) / 2 for x, y in zip(a, b, strict=True)]
    return {**one, "output_tok_per_s_rounds": rounds, "output_tok_per_s_median": statistics.median(rounds)}, True


def comparisons(summary: dict[str, dict[int, dict[str, Any]]], *, instances: int = 1) -> dict[int, dict[str, Any]]:
    """Per concurrency: throughput ratios (of the arms' medians; `<ratio> rounds`: paired round by round; `<ratio>
    instances`: their mean per instance of the arms), the TTFT the farm adds over each reference (ms, pooled
    p50/p99), and each twin against its arm (`vllm-serve-b/vllm-serve`, the A/A ratios). A reference with a twin
    in the run is the two pooled (`reference`; `pooled` names them)."""
    out: dict[int, dict[str, Any]] = {}
    levels = sorted({c for arm in summary.values() for c in arm})
    tput = "output_tok_per_s_median"
    for c in levels:
        farm = summary.get(FARM, {}).get(c, {})
        (serve, serve_pooled), (direct, direct_pooled) = reference(summary, SERVE, c), reference(summary, DIRECT, c)
        out[c] = {
            "pooled": [name for name, pooled in ((DIRECT, direct_pooled), (SERVE, serve_pooled)) if pooled],
            "farm/direct": _ratio(farm.get(tput), direct.get(tput)),
            "farm/vllm-serve": _ratio(farm.get(tput), serve.get(tput)),
            "vllm-serve/direct": _ratio(serve.get(tput), direct.get(tput)),
            "farm/direct rounds": paired_ratios(farm, direct),
            "farm/vllm-serve rounds": paired_ratios(farm, serve),
            "added_ttft_p50_ms_vs_serve": _minus(farm.get("ttft_p50_ms"), serve.get("ttft_p50_ms")),
            "added_ttft_p99_ms_vs_serve": _minus(farm.get("ttft_p99_ms"), serve.get("ttft_p99_ms")),
            "added_ttft_p50_ms_vs_direct": _minus(farm.get("ttft_p50_ms"), direct.get("ttft_p50_ms")),
            "added_ttft_p99_ms_vs_direct": _minus(farm.get("ttft_p99_ms"), direct.get("ttft_p99_ms")),
        }
        for base in (DIRECT, SERVE, FARM):
            twin = summary.get(base + TWIN, {}).get(c)
            if twin is not None and c in summary.get(base, {}):
                key = f"{base}{TWIN}/{base}"
                out[c][key] = _ratio(twin.get(tput), summary[base][c].get(tput))
                out[c][f"{key} rounds"] = paired_ratios(twin, summary[base][c])
        for key in [k for k in out[c] if k.endswith(" rounds")]:
            out[c][key.replace(" rounds", " instances")] = instance_means(out[c][key], instances)
    return out


def checks(compared: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """The bars whose concurrency was measured, each with its value, whether it passed (None: no value) and a
    verdict: `pass`, `FAIL`, `n/a`, or `undecided` for a throughput ratio whose paired rounds fall on both sides of
    the threshold (the run's own round-to-round spread is wider than the margin: more rounds, or a quieter machine,
    are needed to call it). `rounds` holds those paired ratios."""
    if not compared:
        return []
    results = []
    for text, at, key, op, threshold in BARS:
        level = max(compared) if at == "highest" else min(compared) if at == "lowest" else at
        if level not in compared:
            continue
        value = compared[level].get(key)
        passed = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        rounds = compared[level].get(f"{key} rounds")
        instances = compared[level].get(f"{key} instances")
        verdict = {True: "pass", False: "FAIL", None: "n/a"}[passed]
        if passed is not None and rounds and len(rounds) > 1 and min(rounds) < threshold <= max(rounds):
            verdict = "undecided"
        results.append(
            {
                "bar": text,
                "concurrency": level,
                "value": value,
                "threshold": threshold,
                "passed": passed,
                "verdict": verdict,
                "rounds": rounds,
                "instances": instances,
            }
        )
    return results


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _series(values: list[float] | None) -> str:
    """Ratios for a table cell: `1.003 0.998`, or `-` for none."""
    return " ".join(f"{v:.3f}" for v in values or []) or "-"


def render_table(rows: list[list[str]], headers: list[str], *, left: tuple[int, ...] = (1,)) -> str:
    """Columns right-aligned, except the `left` ones (names, free text)."""
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if i in left else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def render(
    summary: dict[str, dict[int, dict[str, Any]]],
    compared: dict[int, dict[str, Any]],
    bars: list[dict[str, Any]],
    cpu: dict[str, dict[int, dict[str, float]]],
) -> str:
    """The end-of-run report: per-arm figures, farm-vs-reference comparisons, the bars, CPU per 1k tokens."""
    arm_rows = []
    for c in sorted(compared):
        for arm in ARM_ORDER:
            s = summary.get(arm, {}).get(c)
            if s is None:
                continue
            rounds = " ".join(f"{x:.0f}" for x in s["output_tok_per_s_rounds"])
            arm_rows.append(
                [
                    str(c),
                    arm,
                    _fmt(s["output_tok_per_s_median"], ".1f"),
                    rounds,
                    _fmt(s["ttft_p50_ms"], ".0f"),
                    _fmt(s["ttft_p99_ms"], ".0f"),
                    _fmt(s["latency_p50_ms"], ".0f"),
                    _fmt(s["tpot_p50_ms"], ".1f"),
                    f"{s['errors']}/{s['requests']}",
                ]
            )
    parts = [
        "Per arm (throughput: median over rounds; percentiles: all requests of all rounds)",
        render_table(
            arm_rows,
            [
                "conc",
                "arm",
                "out tok/s",
                "per round",
                "TTFT p50 ms",
                "TTFT p99 ms",
                "e2e p50 ms",
                "TPOT p50 ms",
                "errors",
            ],
        ),
    ]
    comp_rows = [
        [
            str(c),
            _fmt(v["farm/direct"], ".3f"),
            _fmt(v["farm/vllm-serve"], ".3f"),
            _fmt(v["vllm-serve/direct"], ".3f"),
            _fmt(v["added_ttft_p50_ms_vs_serve"], "+.0f"),
            _fmt(v["added_ttft_p99_ms_vs_serve"], "+.0f"),
            _fmt(v["added_ttft_p50_ms_vs_direct"], "+.0f"),
            _fmt(v["added_ttft_p99_ms_vs_direct"], "+.0f"),
        ]
        for c, v in sorted(compared.items())
    ]
    parts += [
        "",
        "Farm against the references (ratios of output tok/s; added TTFT in ms)",
        render_table(
            comp_rows,
            [
                "conc",
                "farm/direct",
                "farm/serve",
                "serve/direct",
                "+TTFT p50 vs serve",
                "+TTFT p99 vs serve",
                "+TTFT p50 vs direct",
                "+TTFT p99 vs direct",
            ],
        ),
    ]
    bar_rows = [
        [
            b["bar"],
            str(b["concurrency"]),
            _fmt(b["value"], ".3f"),
            _series(b.get("rounds")),
            _series(b.get("instances")),
            b["verdict"],
        ]
        for b in bars
    ]
    pooled = sorted({name for v in compared.values() for name in v.get("pooled", [])})
    if bar_rows:
        parts += [
            "",
            "Bars (value: ratio of the arms' medians; paired rounds: round by round; per instance: their mean over "
            "each start of the arms (--instances); undecided: the rounds fall on both sides of the bar)"
            + "".join(f"; {name} is the mean of {name} and {name}{TWIN}, round by round" for name in pooled),
            render_table(
                bar_rows, ["bar", "conc", "value", "paired rounds", "per instance", "result"], left=(0, 3, 4, 5)
            ),
        ]
    twin_rows = [
        [
            str(c),
            key,
            _fmt(v[key], ".3f"),
            _series(v.get(f"{key} rounds")),
            _series(v.get(f"{key} instances")),
        ]
        for c, v in sorted(compared.items())
        for key in v
        if TWIN + "/" in key and not key.endswith((" rounds", " instances"))
    ]
    if twin_rows:
        parts += [
            "",
            "A/A: each twin against its arm (the same configuration in separate processes; 1.0 but for noise)",
            render_table(twin_rows, ["conc", "ratio", "value", "paired rounds", "mean per instance"], left=(1, 3, 4)),
        ]
    cpu_rows = []
    for arm in ARM_ORDER:
        for c, roles in sorted(cpu.get(arm, {}).items()):
            total = sum(roles.values())
            detail = ", ".join(
                f"{role} {v:.2f}" for role, v in sorted(roles.items(), key=lambda kv: -kv[1]) if v >= 0.005
            )
            cpu_rows.append([str(c), arm, f"{total:.2f}", detail])
    if cpu_rows:
        parts += [
            "",
            "CPU seconds per 1000 output tokens (median over rounds; the bench's own client included "
            "as `bench-client` for HTTP arms)",
            render_table(cpu_rows, ["conc", "arm", "total", "by process"], left=(1, 3)),
        ]
    return "\n".join(parts)
