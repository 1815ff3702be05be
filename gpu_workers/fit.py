"""Does a spec fit this worker? Checked before its engine loads (`farm.placement.place_spec` over this one worker),
so a worker never advertises, and routing never sends requests to, a spec whose model does not fit.

GPU hosts: weights (safetensors headers) + KV-cache reserve (config.json, `max_model_len`) must fit the free VRAM
NVML reports, summed over this worker's devices, and the devices must match the spec's resource profile.
CPU hosts: weights + the CPU KV cache (FARM_CPU_KVCACHE_GIB, what vLLM CPU allocates) must fit the host's RAM; RAM is
shared and overcommitted, so less *available* RAM than that is a warning, not a refusal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farm.model_weights import WeightsUnknown, memory_need_bytes
from farm.placement import ResourceProfile, SpecDemand, WorkerCapacity, place_spec
from gpu_workers.hardware import HardwareReport

log = logging.getLogger(__name__)

_MIB = 2**20


@dataclass(frozen=True)
class FitReport:
    fits: bool
    reason: str
    need_bytes: int = 0
    free_bytes: int = 0


def worker_capacity(hardware: HardwareReport, worker_id: str) -> WorkerCapacity:
    if hardware.gpus:
        return WorkerCapacity(
            worker_id=worker_id,
            kind="gpu",
            gpu_names=tuple(g.name for g in hardware.gpus),
            memory_total_bytes=sum(g.memory_total_mib for g in hardware.gpus) * _MIB,
            memory_free_bytes=sum(g.memory_free_mib for g in hardware.gpus) * _MIB,
            cpu_cores=hardware.cpu_cores,
        )
    return WorkerCapacity(
        worker_id=worker_id,
        kind="cpu",
        cpu_cores=hardware.cpu_cores,
        memory_total_bytes=hardware.memory_total_mib * _MIB,
        memory_free_bytes=hardware.memory_total_mib * _MIB,
    )


def spec_fit(
    *, name: str, spec: dict[str, Any], source_path: Path, hardware: HardwareReport, cpu_kv_cache_gib: float
) -> FitReport:
    """Whether `spec` (a catalogue definition) can be loaded on this host, and why not."""
    try:
        profile = ResourceProfile.parse(spec.get("resource_profile") or "cpu")
    except ValueError as exc:
        return FitReport(False, str(exc))
    if spec.get("engine") == "vllm" and profile.kind == "cpu":  # a GPU engine left on the default profile
        profile = ResourceProfile(kind="gpu")
    engine_args = spec.get("engine_args") or {}
    try:
        weights, kv_reserve = memory_need_bytes(source_path, engine_args)
    except (WeightsUnknown, OSError, ValueError, KeyError) as exc:
        log.warning("%s: weights of %s cannot be sized (%s); not checking that it fits", name, source_path, exc)
        return FitReport(True, "weights unknown")
    if spec.get("engine") == "vllm-cpu" or not hardware.gpus:
        kv_reserve = int(cpu_kv_cache_gib * 2**30)
    worker = worker_capacity(hardware, "this-worker")
    demand = SpecDemand(
        spec=name, source=str(source_path), profile=profile, weights_bytes=weights, kv_reserve_bytes=kv_reserve
    )
    if place_spec(demand, [worker]) is None:
        what = "free VRAM" if worker.kind == "gpu" else "RAM"
        matches = profile.matches(worker)
        reason = (
            f"needs {demand.need_bytes / 2**30:.2f} GiB (weights {weights / 2**30:.2f} + KV cache "
            f"{kv_reserve / 2**30:.2f}), this host has {worker.memory_free_bytes / 2**30:.2f} GiB {what}"
            if matches
            else f"resource profile {spec.get('resource_profile')!r} does not match this "
            f"{worker.kind} host ({', '.join(worker.gpu_names) or f'{worker.cpu_cores} cores'})"
        )
        return FitReport(False, reason, demand.need_bytes, worker.memory_free_bytes)
    if worker.kind == "cpu" and demand.need_bytes > hardware.memory_available_mib * _MIB:
        log.warning(
            "%s needs %.2f GiB, more than the %.2f GiB of RAM available now",
            name,
            demand.need_bytes / 2**30,
            hardware.memory_available_mib / 1024,
        )
    return FitReport(True, "fits", demand.need_bytes, worker.memory_free_bytes)
