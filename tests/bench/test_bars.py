"""The benchmarks' verdicts on the issues' bars: computed from the figures, never typed in."""

from __future__ import annotations

from typing import Any

import pytest

from bench import report
from bench.control_plane import bars


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


def test_a_ratio_whose_paired_rounds_straddle_its_bar_is_undecided() -> None:
    def arm(*rounds: float) -> dict[int, dict[str, object]]:
        figures = dict.fromkeys(("ttft_p50_ms", "ttft_p99_ms", "latency_p50_ms", "tpot_p50_ms"), 1.0)
        median = sorted(rounds)[len(rounds) // 2]
        return {
            64: {
                **figures,
                "output_tok_per_s_median": median,
                "output_tok_per_s_rounds": rounds,
                "errors": 0,
                "requests": 2,
            }
        }

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
