"""The benchmarks' verdicts on the issues' bars: computed from the figures, never typed in."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bench import report, throughput
from bench.control_plane import Timed, bars, open_loop, seconds_of, worst_seconds


def _row(level: str, value: float, rps: float, p99: float, *, mode: str = "json", errors: int = 0) -> dict[str, Any]:
    return {level: value, "mode": mode, "requests_per_s": rps, "latency_p99_ms": p99, "errors": errors}


def test_control_plane_bar_takes_the_best_level_within_the_p99() -> None:
    results = {
        "sweep": [
            _row("concurrency", 16, 560.0, 44.0),
            _row("concurrency", 32, 700.0, 80.0),  # faster, but its p99 is over the bar
            _row("concurrency", 8, 610.0, 30.0, errors=1),  # errors disqualify a level
        ],
        "rates": [_row("rate", 400, 398.0, 49.0), _row("rate", 500, 502.0, 85.0)],
        "streams": {"streams": 1000, "errors": 0, "api_rss_peak_mib": 159.0},
    }
    closed, opened, streams = bars(results)
    assert (closed["value"], closed["passed"]) == (560.0, True)
    assert closed["detail"].startswith("c=16 json")
    assert (opened["value"], opened["passed"]) == (398.0, False)
    assert streams["passed"] is True


def test_control_plane_bar_is_not_judged_without_its_phase() -> None:
    closed, opened, streams = bars({"sweep": [_row("concurrency", 1, 200.0, 9.0)], "rates": [], "streams": {}})
    assert closed["passed"] is False
    assert opened["passed"] is None
    assert streams["passed"] is None
    many_errors = {"streams": 1000, "errors": 3, "api_rss_peak_mib": 159.0}
    assert bars({"sweep": [], "rates": [], "streams": many_errors})[2]["passed"] is False
    too_few = {"streams": 100, "errors": 0, "api_rss_peak_mib": 120.0}
    assert bars({"sweep": [], "rates": [], "streams": too_few})[2]["passed"] is None


def test_serving_bars_of_the_benchmark_issue_hold_at_concurrency_64() -> None:
    ratios = {"farm/direct": 0.96, "farm/vllm-serve": 0.99}
    compared = {
        1: {"added_ttft_p50_ms_vs_serve": 10.0, "added_ttft_p50_ms_vs_direct": 12.0},
        64: ratios,
        128: {"farm/direct": 0.97, "farm/vllm-serve": 1.02},
    }
    verdicts = {check["bar"]: check for check in report.checks(compared)}
    at_64 = {bar: check for bar, check in verdicts.items() if "(#8)" in bar}
    assert {check["concurrency"] for check in at_64.values()} == {64}
    assert [check["passed"] for bar, check in sorted(at_64.items())] == [True, False]  # direct 0.96, serve 0.99
    assert report.checks({1: {}, 8: {}}) and not any("(#8)" in c["bar"] for c in report.checks({1: {}, 8: {}}))


def arm(*rounds: float) -> dict[int, dict[str, object]]:
    """One arm's summary at concurrency 64 with these per-round throughputs."""
    figures = dict.fromkeys(("ttft_p50_ms", "ttft_p99_ms", "latency_p50_ms", "tpot_p50_ms"), 1.0)
    median = sorted(rounds)[len(rounds) // 2]
    return {
        64: {
            **figures,
            "output_tok_per_s_median": median,
            "output_tok_per_s_rounds": list(rounds),
            "errors": 0,
            "requests": 2,
        }
    }


def test_a_ratio_whose_paired_rounds_straddle_its_bar_is_undecided() -> None:
    summary = {"direct": arm(100.0, 110.0), "vllm-serve": arm(114.6, 114.6), "farm": arm(114.7, 107.8)}
    compared = report.comparisons(summary)
    assert compared[64]["farm/vllm-serve rounds"] == pytest.approx([114.7 / 114.6, 107.8 / 114.6])
    verdicts = {check["bar"]: check for check in report.checks(compared) if "(#8)" in check["bar"]}
    serve = next(check for bar, check in verdicts.items() if "vllm-serve" in bar)
    direct = next(check for bar, check in verdicts.items() if "direct" in bar)
    # farm 114.7 / serve 114.6 by the medians (> 1.0), but one round over and one under: the run cannot tell.
    assert (serve["passed"], serve["verdict"]) == (True, "undecided")
    assert (direct["passed"], direct["verdict"]) == (True, "pass")  # 1.15 and 0.98: both over 0.95
    assert "undecided" in report.render(summary, compared, report.checks(compared), {})
    # One round, or arms with different rounds, are not paired.
    assert report.paired_ratios({"output_tok_per_s_rounds": [1.0]}, {"output_tok_per_s_rounds": [1.0, 2.0]}) is None


def test_a_twin_is_compared_with_its_arm_round_by_round_and_per_instance() -> None:
    # An A/A run: vllm-serve and its twin, four rounds over two instances (two starts of both arms).
    summary = {"vllm-serve": arm(100.0, 100.0, 100.0, 100.0), "vllm-serve-b": arm(102.0, 104.0, 99.0, 97.0)}
    compared = report.comparisons(summary, instances=2)[64]
    assert compared["vllm-serve-b/vllm-serve"] == pytest.approx(102.0 / 100.0)  # the medians
    assert compared["vllm-serve-b/vllm-serve rounds"] == pytest.approx([1.02, 1.04, 0.99, 0.97])
    assert compared["vllm-serve-b/vllm-serve instances"] == pytest.approx([1.03, 0.98])
    assert "farm-b/farm" not in compared and "direct-b/direct" not in compared  # no twin, no A/A ratio
    rendered = report.render(summary, {64: compared}, report.checks({64: compared}), {})
    assert "vllm-serve-b/vllm-serve" in rendered and "1.030 0.980" in rendered


def test_a_reference_with_a_twin_is_the_mean_of_the_two_round_by_round() -> None:
    summary = {
        "vllm-serve": arm(100.0, 96.0, 100.0),
        "vllm-serve-b": arm(104.0, 100.0, 98.0),
        "farm": arm(101.0, 99.0, 100.0),
        "direct": arm(100.0, 100.0, 100.0),
    }
    compared = report.comparisons(summary)[64]
    assert compared["pooled"] == ["vllm-serve"]
    assert compared["farm/vllm-serve rounds"] == pytest.approx([101 / 102, 99 / 98, 100 / 99])
    assert compared["farm/vllm-serve"] == pytest.approx(100 / 99)  # the medians: farm 100, pooled 102 98 99 -> 99
    assert compared["farm/direct rounds"] == pytest.approx([1.01, 0.99, 1.0])  # no twin: the arm alone
    rendered = report.render(summary, {64: compared}, report.checks({64: compared}), {})
    assert "vllm-serve is the mean of vllm-serve and vllm-serve-b" in rendered
    # A twin that ran other rounds is not pooled.
    uneven = report.comparisons({**summary, "vllm-serve-b": arm(104.0, 100.0)})[64]
    assert uneven["farm/vllm-serve rounds"] == pytest.approx([1.01, 99 / 96, 1.0])
    assert uneven["pooled"] == []


def test_a_bar_carries_its_paired_rounds_mean_per_instance() -> None:
    summary = {"vllm-serve": arm(100.0, 100.0, 100.0), "farm": arm(101.0, 99.0, 96.0)}
    serve = next(c for c in report.checks(report.comparisons(summary, instances=3)) if c["bar"].endswith("(#8)"))
    assert serve["instances"] == pytest.approx([1.01, 0.99, 0.96])
    assert serve["verdict"] == "undecided"
    # One instance, or rounds that do not split evenly, give no means per instance.
    assert report.instance_means([1.0, 1.1], 1) is None
    assert report.instance_means([1.0, 1.1, 1.2], 2) is None


def test_the_serving_bench_takes_twins_and_splits_its_rounds_between_instances(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    base = ["--model-dir", str(tmp_path), "--concurrency", "64"]
    args = throughput.parse_args([*base, "--arms", "vllm-serve,vllm-serve-b", "--rounds", "6", "--instances", "3"])
    assert (args.arm_names, args.instances) == (["vllm-serve", "vllm-serve-b"], 3)
    arms = throughput.make_arms(args, tmp_path)
    assert [a.name for a in arms] == ["vllm-serve", "vllm-serve-b"]
    assert arms[0].log_path != arms[1].log_path and arms[0].port != arms[1].port
    for bad in (["--rounds", "5", "--instances", "2"], ["--arms", "farm-c"]):
        with pytest.raises(SystemExit):
            throughput.parse_args([*base, *bad])
    # The arms start, and each round rotates, in a fixed order unless asked to keep the order given.
    named = ["--arms", "farm,vllm-serve-b,vllm-serve"]
    fixed = throughput.make_arms(throughput.parse_args([*base, *named]), tmp_path)
    assert [a.name for a in fixed] == ["vllm-serve", "vllm-serve-b", "farm"]
    given = throughput.make_arms(throughput.parse_args([*base, *named, "--arm-order", "given"]), tmp_path)
    assert [a.name for a in given] == ["farm", "vllm-serve-b", "vllm-serve"]


def test_open_loop_worst_seconds_find_a_pause() -> None:
    """A tail packed into one second (a pause) is told apart from one spread over the run: the second with the
    highest p99 comes first, with its epoch time to line up with the farm's logs; errors are left out."""
    start = 1_000.0

    def second(index: int, latency: float, count: int = 100) -> list[Timed]:
        return [
            Timed(start + index + i / count, f"{index}-{i}", None, start + index + i / count + latency)
            for i in range(count)
        ]

    timed = second(0, 0.010) + second(1, 0.090) + second(2, 0.020)
    timed.append(Timed(start + 2.5, None, None, start + 9.0, error="HTTP 503"))
    worst = worst_seconds(seconds_of(timed), count=2)
    assert [row["second"] for row in worst] == [1, 2]
    assert worst[0]["at"] == start + 1
    assert worst[0]["requests"] == 100 and worst[0]["p99_ms"] == pytest.approx(90.0, abs=0.5)
    assert worst[1]["p99_ms"] == pytest.approx(20.0, abs=0.5)
    assert seconds_of([]) == []


def test_open_loop_creates_each_request_at_its_arrival() -> None:
    """The open loop's tasks are created as their arrival times come, not all at once at the start (10,000+
    waiting tasks kept the client's loop busy for the level's first second); each records how late it was sent."""

    class Client:
        def __init__(self) -> None:
            self.tasks_at_send: list[int] = []

        async def send(self, *, stream: bool, max_tokens: int) -> Timed:
            self.tasks_at_send.append(len(asyncio.all_tasks()))
            await asyncio.sleep(0.001)
            return Timed(0.0, "j", None, 0.0)

    client = Client()
    timed, elapsed = asyncio.run(open_loop(client, rate=400.0, seconds=0.5, stream=False, max_tokens=1))  # type: ignore[arg-type]
    assert 120 <= len(timed) <= 280 and elapsed >= 0.45
    assert max(client.tasks_at_send) < 30  # the driver and the few requests in flight, not every request
    assert all(t.late >= 0.0 for t in timed)
