"""Which spec serves a request: a pure decision over plain data (no database, Redis or clock inside)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class SpecState:
    name: str
    weight: int
    live_replicas: int
    running: int = 0
    capacity: int = 0


def route_request(specs: list[SpecState], rng: random.Random | None = None) -> SpecState | None:
    """Weighted choice among specs with a live replica; weight-0 specs (standby) only when nothing else is up.

    None means no replica serves the model at all (the API answers 503).
    """
    live = [spec for spec in specs if spec.live_replicas > 0]
    weighted = [spec for spec in live if spec.weight > 0]
    if weighted:
        return (rng or random).choices(weighted, weights=[spec.weight for spec in weighted])[0]
    if live:  # only standbys are up: the least loaded one answers
        return min(live, key=lambda spec: spec.running / max(spec.capacity, 1))
    return None
