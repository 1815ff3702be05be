"""Which worker should load which spec: a pure decision over plain data (no database, Redis or clock inside).

A spec is placed on a worker only if its memory need (weights from safetensors headers + KV-cache reserve, see
`farm.model_weights`) fits the worker's free accelerator memory (RAM for CPU workers), after unloading, least
recently used first, models that serve nothing right now. Never otherwise: 0 placements where the model does not
fit. Among the workers where it fits, the order of preference is:

1. the spec is already loaded there;
2. the weights are already in the worker's local cache (no download or copy);
3. nothing has to be unloaded;
4. best fit: the least memory left over (big devices stay free for big models); then the worker id, for
   determinism.

One worker process serves one device or one fixed set of devices (`gpu:L4 x2` is a worker with two L4s), so a
worker's memory is the sum over its devices.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

_PROFILE_RE = re.compile(r"^(?P<kind>cpu|gpu)(?::(?P<what>[A-Za-z0-9._-]+))?(?: x(?P<count>\d+))?$")


@dataclass(frozen=True)
class ResourceProfile:
    """`cpu`, `cpu:16` (cores), `gpu:A100-80GB`, `gpu:L4 x2` (model and device count)."""

    kind: str  # cpu | gpu
    gpu_model: str = ""
    count: int = 1  # GPUs for `gpu`, cores for `cpu:<n>` (0: any)

    @classmethod
    def parse(cls, text: str) -> ResourceProfile:
        match = _PROFILE_RE.match(text.strip())
        cpu_ok = match is not None and (
            match["kind"] == "gpu" or (match["count"] is None and (match["what"] is None or match["what"].isdigit()))
        )
        if match is None or not cpu_ok:
            raise ValueError(f"resource profile {text!r}: expected `cpu`, `cpu:<cores>`, `gpu:<model>[ x<count>]`")
        if match["kind"] == "cpu":
            return cls(kind="cpu", count=int(match["what"] or 0))
        return cls(kind="gpu", gpu_model=match["what"] or "", count=int(match["count"] or 1))

    def matches(self, worker: WorkerCapacity) -> bool:
        if self.kind == "cpu":
            return worker.kind == "cpu" and worker.cpu_cores >= self.count
        if worker.kind != "gpu" or len(worker.gpu_names) < self.count:
            return False
        return not self.gpu_model or all(_gpu_matches(self.gpu_model, name) for name in worker.gpu_names)


def _gpu_matches(wanted: str, device_name: str) -> bool:
    """`A100-80GB` matches `NVIDIA A100-SXM4-80GB`: every part of the wanted name appears in the device's."""
    name = device_name.upper()
    return all(part in name for part in re.split(r"[-_. ]+", wanted.upper()) if part)


@dataclass(frozen=True)
class LoadedSpec:
    """A spec loaded on a worker: its memory, when it last served a request, and requests running on it now."""

    spec: str
    memory_bytes: int
    last_used: float
    running: int = 0


@dataclass(frozen=True)
class WorkerCapacity:
    worker_id: str
    kind: str  # gpu | cpu
    memory_total_bytes: int
    memory_free_bytes: int
    gpu_names: tuple[str, ...] = ()
    cpu_cores: int = 0
    loaded: tuple[LoadedSpec, ...] = ()
    cached_sources: frozenset[str] = field(default_factory=frozenset)
    accepts_work: bool = True


@dataclass(frozen=True)
class SpecDemand:
    spec: str
    source: str
    profile: ResourceProfile
    weights_bytes: int
    kv_reserve_bytes: int

    @property
    def need_bytes(self) -> int:
        return self.weights_bytes + self.kv_reserve_bytes


@dataclass(frozen=True)
class Placement:
    worker_id: str
    unload: tuple[str, ...] = ()  # specs to unload first, least recently used first
    already_loaded: bool = False
    cached: bool = False
    free_after_bytes: int = 0


def lru_unload(loaded: Iterable[LoadedSpec], *, free_bytes: int, need_bytes: int) -> tuple[str, ...] | None:
    """The idle specs to unload, least recently used first, until `need_bytes` fit; () if they fit already, None
    if they cannot fit even with every idle spec unloaded (a spec running requests is never unloaded)."""
    if free_bytes >= need_bytes:
        return ()
    unload: list[str] = []
    for spec in sorted((s for s in loaded if s.running == 0), key=lambda s: (s.last_used, s.spec)):
        unload.append(spec.spec)
        free_bytes += spec.memory_bytes
        if free_bytes >= need_bytes:
            return tuple(unload)
    return None


def placement_options(demand: SpecDemand, workers: Iterable[WorkerCapacity]) -> list[Placement]:
    """Every worker where the spec fits, best first (see the module docstring)."""
    options: list[tuple[tuple, Placement]] = []
    for worker in workers:
        if not worker.accepts_work or not demand.profile.matches(worker):
            continue
        if any(loaded.spec == demand.spec for loaded in worker.loaded):
            options.append(
                (
                    (0, 0, 0, 0, worker.worker_id),
                    Placement(
                        worker_id=worker.worker_id,
                        already_loaded=True,
                        cached=True,
                        free_after_bytes=worker.memory_free_bytes,
                    ),
                )
            )
            continue
        if demand.need_bytes > worker.memory_total_bytes:
            continue
        unload = lru_unload(worker.loaded, free_bytes=worker.memory_free_bytes, need_bytes=demand.need_bytes)
        if unload is None:
            continue
        freed = sum(s.memory_bytes for s in worker.loaded if s.spec in unload)
        free_after = worker.memory_free_bytes + freed - demand.need_bytes
        cached = demand.source in worker.cached_sources
        rank = (1, 0 if cached else 1, 1 if unload else 0, free_after, worker.worker_id)
        options.append(
            (rank, Placement(worker_id=worker.worker_id, unload=unload, cached=cached, free_after_bytes=free_after))
        )
    return [placement for _, placement in sorted(options, key=lambda option: option[0])]


def place_spec(demand: SpecDemand, workers: Iterable[WorkerCapacity]) -> Placement | None:
    """The best worker to load `demand` on, or None when it fits nowhere."""
    options = placement_options(demand, workers)
    return options[0] if options else None
