"""Which spec serves a request, whether a model is overloaded, and how long a failing spec is backed off: pure
decisions over plain data (no database, Redis or clock inside; the caller passes `now`).

Order of preference in `route_request`:
1. weighted specs (weight > 0) with a live replica, not backed off, not saturated: a weighted random choice;
2. the same, saturated included (the queue absorbs the burst; `model_overloaded` bounds it);
3. warm standbys (weight 0) with a live replica, not backed off: the least loaded;
4. every live spec is backed off: the one whose back-off ends first (a request is never refused while a replica is
   up; the back-off only steers traffic away from a failing spec while others can take it);
5. no spec is loaded anywhere: a spec that a live worker loads on first demand (`cold_replicas`, a worker's
   `lazy_specs`), chosen as in 1-4 among those. The request waits for the load (a cold start) instead of a 503.
`exclude` names specs a failed-over request already tried: they are avoided while another live spec exists.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol


@dataclass(frozen=True)
class SpecState:
    """One spec of a model as the router sees it: replicas from the live registry, back-off from `spec_health`."""

    name: str
    weight: int
    live_replicas: int
    running: int = 0  # requests running on its replicas
    capacity: int = 0  # requests its replicas run at once (sum of their concurrency)
    queued: int = 0  # messages waiting in its queue (LLEN of `infer.<spec>`, cached briefly)
    backoff_until: float = 0.0  # epoch seconds; the spec is skipped before then while another can serve
    cold_replicas: int = 0  # live workers that would load it on first demand (it is not loaded there yet)

    @property
    def saturated(self) -> bool:
        return self.capacity > 0 and self.running >= self.capacity

    def backed_off(self, now: float) -> bool:
        return self.backoff_until > now


class Replica(Protocol):
    """What routing reads of a live worker (`farm.registry.LiveWorker`)."""

    specs: tuple[str, ...]
    lazy_specs: tuple[str, ...]
    running: int
    capacity: int

    @property
    def accepts_work(self) -> bool: ...

    def fresh(self, now: float) -> bool: ...


def spec_states(
    specs: Iterable[tuple[str, int]],
    workers: Iterable[Replica],
    *,
    now: float,
    backoffs: Mapping[str, float] | None = None,
    depths: Mapping[str, int] | None = None,
) -> list[SpecState]:
    """The router's view of a model's `(spec name, weight)`s: replicas that accept work and beat recently, their
    load, back-offs and queue depths, and the workers that would load a spec on demand."""
    wanted = dict(specs)
    totals: dict[str, list[int]] = {name: [0, 0, 0, 0] for name in wanted}
    for worker in workers:
        if not worker.accepts_work or not worker.fresh(now):
            continue
        for name in worker.specs:
            stats = totals.get(name)
            if stats is not None:
                stats[0] += 1
                stats[1] += worker.running
                stats[2] += worker.capacity
        for name in worker.lazy_specs:
            if name in totals:
                totals[name][3] += 1
    backoffs = backoffs or {}
    depths = depths or {}
    return [
        SpecState(
            name=name,
            weight=weight,
            live_replicas=totals[name][0],
            running=totals[name][1],
            capacity=totals[name][2],
            queued=depths.get(name, 0),
            backoff_until=backoffs.get(name, 0.0),
            cold_replicas=totals[name][3],
        )
        for name, weight in wanted.items()
    ]


def route_request(
    specs: Collection[SpecState], rng: random.Random | None = None, *, now: float = 0.0, exclude: Collection[str] = ()
) -> SpecState | None:
    """The spec that takes a request (see the module docstring), or None when no worker serves or can load any
    spec of the model (503)."""
    live = [spec for spec in specs if spec.live_replicas > 0]
    if not live:  # a cold start: route among the specs some worker loads on demand, by the same rules
        live = [replace(spec, live_replicas=spec.cold_replicas) for spec in specs if spec.cold_replicas > 0]
    if exclude:
        fresh = [spec for spec in live if spec.name not in exclude]
        live = fresh or live  # failover to another spec when one is up; else the same spec again
    healthy = [spec for spec in live if not spec.backed_off(now)]
    weighted = [spec for spec in healthy if spec.weight > 0]
    unsaturated = [spec for spec in weighted if not spec.saturated]
    pool = unsaturated or weighted
    if len(pool) == 1:  # the common case (one spec per model): no draw
        return pool[0]
    if pool:
        return (rng or random).choices(pool, weights=[spec.weight for spec in pool])[0]
    if healthy:  # only standbys are up: the least loaded one answers
        return min(healthy, key=lambda spec: spec.running / max(spec.capacity, 1))
    if live:  # everything up is backed off: the spec whose back-off ends first
        return min(live, key=lambda spec: (spec.backoff_until, spec.running / max(spec.capacity, 1)))
    return None


def model_overloaded(specs: Collection[SpecState], *, queue_bound: int) -> bool:
    """True when every live replica of the model is saturated and every live spec's queue holds more than
    `queue_bound` messages: a new request would only wait behind them (the API answers 429 with Retry-After).
    A model with no live replica is not overloaded but unavailable (503); `queue_bound` < 0 turns the check off."""
    if queue_bound < 0:
        return False
    live = [spec for spec in specs if spec.live_replicas > 0]
    return bool(live) and all(spec.saturated and spec.queued > queue_bound for spec in live)


@dataclass(frozen=True)
class BackoffPolicy:
    """How long a failing spec is skipped: `base_s * factor ** (failures - 1)`, capped at `max_s`. The failure count
    is forgotten `reset_after_s` after the last failure. The first back-offs are short, so that with N specs failing
    in turn each is tried again before any back-off grows long."""

    base_s: float = 2.0
    factor: float = 2.0
    max_s: float = 120.0
    reset_after_s: float = 300.0

    def delay_s(self, failures: int) -> float:
        if failures <= 0:
            return 0.0
        return min(self.max_s, self.base_s * self.factor ** (failures - 1))


BACKOFF_POLICY = BackoffPolicy()
