"""`route_request`: which spec serves a request, as a pure decision over `SpecState`s."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from farm.routing import SpecState, route_request

DRAWS = 20_000


def spec(name: str, *, weight: int = 100, live: int = 1, running: int = 0, capacity: int = 0) -> SpecState:
    return SpecState(name=name, weight=weight, live_replicas=live, running=running, capacity=capacity)


def draw(specs: list[SpecState], n: int = DRAWS, seed: int = 7) -> Counter[str]:
    rng = random.Random(seed)
    counts: Counter[str] = Counter()
    for _ in range(n):
        choice = route_request(specs, rng)
        assert choice is not None
        counts[choice.name] += 1
    return counts


@pytest.mark.parametrize("specs", [
    pytest.param([], id="no-specs"),
    pytest.param([spec("a", live=0)], id="one-dead"),
    pytest.param([spec("a", live=0), spec("b", weight=0, live=0)], id="weighted-and-standby-dead"),
])
def test_nothing_live_routes_nowhere(specs: list[SpecState]) -> None:
    assert route_request(specs, random.Random(0)) is None


@pytest.mark.parametrize(("specs", "expected"), [
    pytest.param([spec("a")], "a", id="single-live"),
    pytest.param([spec("a", live=0), spec("b")], "b", id="dead-weighted-skipped"),
    pytest.param([spec("a", weight=0), spec("b", weight=1)], "b", id="standby-skipped-when-weighted-live"),
    pytest.param([spec("a", live=0), spec("b", weight=0)], "b", id="standby-when-weighted-dead"),
    pytest.param([spec("a", weight=0, running=9, capacity=10), spec("b", weight=0, running=2, capacity=10)], "b",
                 id="least-loaded-standby"),
    pytest.param([spec("a", weight=0, running=4, capacity=8), spec("b", weight=0, running=3, capacity=4)], "a",
                 id="load-is-a-ratio-not-a-count"),
    pytest.param([spec("a", weight=0, running=2, capacity=0), spec("b", weight=0, running=1, capacity=0)], "b",
                 id="zero-capacity-counts-as-one"),
    pytest.param([spec("a", weight=0, running=5, capacity=10, live=0), spec("b", weight=0, running=9, capacity=10)],
                 "b", id="dead-standby-never-chosen"),
])
def test_always_the_same_choice(specs: list[SpecState], expected: str) -> None:
    assert set(draw(specs, n=500)) == {expected}


@pytest.mark.parametrize("weights", [(1, 1), (3, 1), (70, 20, 10), (1, 99)])
def test_weights_split_traffic_in_proportion(weights: tuple[int, ...]) -> None:
    specs = [spec(f"s{i}", weight=w) for i, w in enumerate(weights)]
    counts = draw([*specs, spec("standby", weight=0), spec("dead", weight=1000, live=0)])
    assert set(counts) == {s.name for s in specs}
    for s in specs:
        assert counts[s.name] / DRAWS == pytest.approx(s.weight / sum(weights), abs=0.015)


def test_replica_count_does_not_change_the_split() -> None:
    counts = draw([spec("a", weight=1, live=9), spec("b", weight=1, live=1)])
    assert counts["a"] / DRAWS == pytest.approx(0.5, abs=0.015)


def test_a_seeded_generator_makes_routing_reproducible() -> None:
    specs = [spec("a", weight=1), spec("b", weight=2), spec("c", weight=3)]
    assert draw(specs, n=200, seed=42) == draw(specs, n=200, seed=42)
