"""`route_request`: which spec serves a request, as a pure decision over `SpecState`s."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from farm.routing import BackoffPolicy, SpecState, model_overloaded, route_request, spec_states

DRAWS = 20_000


def spec(
    name: str,
    *,
    weight: int = 100,
    live: int = 1,
    running: int = 0,
    capacity: int = 0,
    cold: int = 0,
    backoff_until: float = 0.0,
) -> SpecState:
    return SpecState(
        name=name,
        weight=weight,
        live_replicas=live,
        running=running,
        capacity=capacity,
        cold_replicas=cold,
        backoff_until=backoff_until,
    )


def draw(specs: list[SpecState], n: int = DRAWS, seed: int = 7) -> Counter[str]:
    rng = random.Random(seed)
    counts: Counter[str] = Counter()
    for _ in range(n):
        choice = route_request(specs, rng)
        assert choice is not None
        counts[choice.name] += 1
    return counts


@pytest.mark.parametrize(
    "specs",
    [
        pytest.param([], id="no-specs"),
        pytest.param([spec("a", live=0)], id="one-dead"),
        pytest.param([spec("a", live=0), spec("b", weight=0, live=0)], id="weighted-and-standby-dead"),
    ],
)
def test_nothing_live_routes_nowhere(specs: list[SpecState]) -> None:
    assert route_request(specs, random.Random(0)) is None


@pytest.mark.parametrize(
    ("specs", "expected"),
    [
        pytest.param([spec("a")], "a", id="single-live"),
        pytest.param([spec("a", live=0), spec("b")], "b", id="dead-weighted-skipped"),
        pytest.param([spec("a", weight=0), spec("b", weight=1)], "b", id="standby-skipped-when-weighted-live"),
        pytest.param([spec("a", live=0), spec("b", weight=0)], "b", id="standby-when-weighted-dead"),
        pytest.param(
            [spec("a", weight=0, running=9, capacity=10), spec("b", weight=0, running=2, capacity=10)],
            "b",
            id="least-loaded-standby",
        ),
        pytest.param(
            [spec("a", weight=0, running=4, capacity=8), spec("b", weight=0, running=3, capacity=4)],
            "a",
            id="load-is-a-ratio-not-a-count",
        ),
        pytest.param(
            [spec("a", weight=0, running=2, capacity=0), spec("b", weight=0, running=1, capacity=0)],
            "b",
            id="zero-capacity-counts-as-one",
        ),
        pytest.param(
            [spec("a", weight=0, running=5, capacity=10, live=0), spec("b", weight=0, running=9, capacity=10)],
            "b",
            id="dead-standby-never-chosen",
        ),
    ],
)
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


# --- load, back-off and failover ------------------------------------------------------------------------------------

NOW = 1_000.0


def state(
    name: str,
    *,
    weight: int = 100,
    live: int = 1,
    running: int = 0,
    capacity: int = 0,
    queued: int = 0,
    backoff_until: float = 0.0,
) -> SpecState:
    return SpecState(
        name=name,
        weight=weight,
        live_replicas=live,
        running=running,
        capacity=capacity,
        queued=queued,
        backoff_until=backoff_until,
    )


def choices(specs: list[SpecState], *, exclude: tuple[str, ...] = (), n: int = 300) -> set[str]:
    rng = random.Random(3)
    picked = {route_request(specs, rng, now=NOW, exclude=exclude) for _ in range(n)}
    return {spec.name if spec is not None else None for spec in picked}


@pytest.mark.parametrize(
    ("specs", "exclude", "expected"),
    [
        pytest.param([state("a", backoff_until=NOW + 5), state("b")], (), {"b"}, id="backed-off-spec-skipped"),
        pytest.param(
            [state("a", backoff_until=NOW - 1), state("b")], (), {"a", "b"}, id="expired-backoff-counts-again"
        ),
        pytest.param(
            [state("a", backoff_until=NOW + 5), state("b", backoff_until=NOW + 9)],
            (),
            {"a"},
            id="all-backed-off-the-first-to-end-answers",
        ),
        pytest.param(
            [state("a", backoff_until=NOW + 5), state("b", weight=0)],
            (),
            {"b"},
            id="standby-beats-a-backed-off-weighted-spec",
        ),
        pytest.param(
            [state("a", backoff_until=NOW + 5), state("b", weight=0, live=0)],
            (),
            {"a"},
            id="backed-off-but-only-replica-still-answers",
        ),
        pytest.param(
            [state("a", running=4, capacity=4), state("b", running=1, capacity=4)],
            (),
            {"b"},
            id="saturated-spec-skipped-while-another-has-room",
        ),
        pytest.param(
            [state("a", running=4, capacity=4), state("b", running=8, capacity=4)],
            (),
            {"a", "b"},
            id="all-saturated-split-by-weight",
        ),
        pytest.param(
            [state("a", running=4, capacity=4), state("b", weight=0)],
            (),
            {"a"},
            id="saturated-weighted-spec-before-standby",
        ),
        pytest.param([state("a"), state("b")], ("a",), {"b"}, id="failover-to-the-next-spec"),
        pytest.param([state("a"), state("b", weight=0)], ("a",), {"b"}, id="failover-to-the-standby"),
        pytest.param([state("a"), state("b", live=0)], ("a",), {"a"}, id="failover-nowhere-else-same-spec"),
        pytest.param([state("a"), state("b"), state("c", live=0)], ("a", "b"), {"a", "b"}, id="all-tried-start-over"),
        pytest.param([state("a", live=0), state("b", live=0)], ("a",), {None}, id="failover-no-replica-503"),
    ],
)
def test_load_backoff_and_failover(specs: list[SpecState], exclude: tuple[str, ...], expected: set[str]) -> None:
    assert choices(specs, exclude=exclude) == expected


@pytest.mark.parametrize(
    ("specs", "bound", "overloaded"),
    [
        pytest.param([state("a", running=4, capacity=4, queued=11)], 10, True, id="saturated-and-queue-over-bound"),
        pytest.param([state("a", running=4, capacity=4, queued=10)], 10, False, id="queue-at-bound-is-fine"),
        pytest.param([state("a", running=3, capacity=4, queued=99)], 10, False, id="a-free-slot-is-fine"),
        pytest.param(
            [state("a", running=4, capacity=4, queued=99), state("b", running=0, capacity=4)],
            10,
            False,
            id="another-spec-has-room",
        ),
        pytest.param(
            [state("a", running=4, capacity=4, queued=99), state("b", running=9, capacity=4, queued=11)],
            10,
            True,
            id="every-spec-saturated-and-queued",
        ),
        pytest.param(
            [state("a", running=4, capacity=4, queued=99), state("b", live=0)], 10, True, id="dead-specs-do-not-count"
        ),
        pytest.param([state("a", live=0, queued=99)], 10, False, id="no-replica-is-503-not-429"),
        pytest.param([state("a", running=4, capacity=4, queued=99)], -1, False, id="bound-off"),
        pytest.param([state("a", running=5, capacity=0, queued=99)], 10, False, id="unknown-capacity-never-saturated"),
    ],
)
def test_model_overloaded(specs: list[SpecState], bound: int, overloaded: bool) -> None:
    assert model_overloaded(specs, queue_bound=bound) is overloaded


@pytest.mark.parametrize(
    ("failures", "delay"), [(0, 0.0), (1, 2.0), (2, 4.0), (3, 8.0), (6, 64.0), (7, 120.0), (50, 120.0)]
)
def test_backoff_grows_and_is_capped(failures: int, delay: float) -> None:
    assert BackoffPolicy().delay_s(failures) == delay


def test_backoff_lets_every_spec_be_tried_before_it_grows_long() -> None:
    """Three specs failing in turn: each is skipped only while another is healthy, then tried again."""
    policy = BackoffPolicy()
    until = {"a": 0.0, "b": 0.0, "c": 0.0}
    failures = dict.fromkeys(until, 0)
    now, tried = NOW, []
    for _ in range(9):
        specs = [state(name, backoff_until=until[name]) for name in until]
        choice = route_request(specs, random.Random(len(tried)), now=now)
        assert choice is not None
        tried.append(choice.name)
        failures[choice.name] += 1
        until[choice.name] = now + policy.delay_s(failures[choice.name])
        now += 0.5
    assert set(tried[:3]) == {"a", "b", "c"}  # the first three requests each hit a different spec
    assert all(count >= 2 for count in failures.values())  # and every spec gets tried again


@pytest.mark.parametrize(
    ("specs", "expected"),
    [
        pytest.param([spec("a", live=0, cold=1)], {"a"}, id="only-cold-is-loaded-on-demand"),
        pytest.param([spec("a", live=1), spec("b", live=0, cold=3)], {"a"}, id="a-loaded-spec-beats-a-cold-start"),
        pytest.param(
            [spec("a", live=1, backoff_until=NOW + 60), spec("b", live=0, cold=1)],
            {"a"},
            id="even-backed-off-a-loaded-spec-beats-a-cold-start",
        ),
        pytest.param(
            [spec("a", live=0, cold=1, backoff_until=NOW + 60), spec("b", weight=1, live=0, cold=1)],
            {"b"},
            id="a-cold-spec-that-failed-to-load-is-backed-off",
        ),
        pytest.param(
            [spec("a", live=0, cold=1, backoff_until=NOW + 60), spec("b", live=0, cold=1, backoff_until=NOW + 30)],
            {"b"},
            id="all-cold-backed-off-the-first-to-end",
        ),
        pytest.param(
            [spec("a", weight=0, live=0, cold=1), spec("b", live=0, cold=1)],
            {"b"},
            id="weighted-cold-before-standby-cold",
        ),
        pytest.param([spec("a", live=0, cold=0), spec("b", live=0, cold=0)], set(), id="nobody-can-load-it"),
    ],
)
def test_cold_start_routing(specs: list[SpecState], expected: set[str]) -> None:
    """A spec that no worker has loaded is routed to a worker that loads it on demand, only when no spec of the
    model is loaded anywhere; the usual rules (weights, standbys, back-off) choose among the cold ones."""
    chosen = {(route_request(specs, random.Random(seed), now=NOW) or spec("-")).name for seed in range(50)}
    assert chosen == (expected or {"-"})


@dataclass
class FakeWorker:
    specs: tuple[str, ...]
    lazy_specs: tuple[str, ...] = ()
    running: int = 0
    capacity: int = 4
    status: str = "ready"
    seen_at: float = NOW

    @property
    def accepts_work(self) -> bool:
        return self.status == "ready"

    def fresh(self, now: float) -> bool:
        return now - self.seen_at <= 3.0


def test_spec_states_count_only_fresh_workers_that_take_work() -> None:
    workers = [
        FakeWorker(("a",), running=2),
        FakeWorker(("a", "b"), running=1),
        FakeWorker(("b",), status="draining"),
        FakeWorker(("b",), seen_at=NOW - 10),
        FakeWorker(("other",)),
    ]
    states = spec_states([("a", 3), ("b", 0)], workers, now=NOW, backoffs={"b": NOW + 4}, depths={"a": 7})
    assert states == [
        SpecState(name="a", weight=3, live_replicas=2, running=3, capacity=8, queued=7),
        SpecState(name="b", weight=0, live_replicas=1, running=1, capacity=4, backoff_until=NOW + 4),
    ]


def test_spec_states_count_workers_that_load_a_spec_on_demand() -> None:
    workers = [
        FakeWorker(("a",), lazy_specs=("b",)),
        FakeWorker((), lazy_specs=("a", "b")),
        FakeWorker((), lazy_specs=("b",), status="quarantined"),
        FakeWorker((), lazy_specs=("b",), seen_at=NOW - 10),
    ]
    states = {state.name: state for state in spec_states([("a", 1), ("b", 1)], workers, now=NOW)}
    assert (states["a"].live_replicas, states["a"].cold_replicas) == (1, 1)
    assert (states["b"].live_replicas, states["b"].cold_replicas, states["b"].capacity) == (0, 2, 0)
