"""Reading a worker's heartbeat entry (the registry JSON) into plain figures for the admin and for metrics.

Import-light (no Django): the worker's own `/metrics` uses it too. Heartbeats come from workers of any version, so
every field is read defensively: a missing or malformed figure is None, never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_MIB = 2**20


@dataclass(frozen=True)
class DeviceFigures:
    """One accelerator as its worker last reported it (NVML figures)."""

    index: int
    name: str
    uuid: str
    memory_total_bytes: int | None
    memory_used_bytes: int | None
    memory_free_bytes: int | None
    utilization_pct: float | None
    temperature_c: float | None
    power_w: float | None

    @property
    def memory_used_pct(self) -> float | None:
        if not self.memory_total_bytes or self.memory_used_bytes is None:
            return None
        return min(100.0, 100.0 * self.memory_used_bytes / self.memory_total_bytes)


@dataclass(frozen=True)
class LoadedModel:
    """A spec loaded on a worker (the heartbeat's `models`)."""

    spec: str
    model: str
    weights_bytes: int | None


@dataclass(frozen=True)
class WorkerFigures:
    """The admin's and the metrics' view of one heartbeat."""

    worker_id: str
    hostname: str
    status: str
    specs: tuple[str, ...]
    queues: tuple[str, ...]
    kind: str  # gpu | cpu
    devices: tuple[DeviceFigures, ...]
    cpu_cores: int | None
    memory_total_bytes: int | None
    memory_available_bytes: int | None
    running: int
    capacity: int
    completed: int
    failed: int
    tokens: int
    tokens_per_s: float | None
    started_at: float | None
    seen_at: float | None
    loaded: tuple[LoadedModel, ...] = ()

    @property
    def load_pct(self) -> float:
        return min(100.0, 100.0 * self.running / self.capacity) if self.capacity > 0 else 0.0


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _int(value: Any, default: int = 0) -> int:
    number = _number(value)
    return int(number) if number is not None else default


def _bytes(entry: dict[str, Any], *stems: str) -> int | None:
    """A memory figure under any of `<stem>_bytes`, `<stem>_mib` or `<stem>` (bytes) names."""
    for stem in stems:
        for suffix, scale in (("_bytes", 1), ("_mib", _MIB), ("_mb", _MIB), ("", 1)):
            value = _number(entry.get(stem + suffix))
            if value is not None:
                return int(value * scale)
    return None


def _first(entry: dict[str, Any], *names: str) -> float | None:
    for name in names:
        value = _number(entry.get(name))
        if value is not None:
            return value
    return None


def _device(raw: Any, position: int) -> DeviceFigures | None:
    if not isinstance(raw, dict):
        return None
    memory = raw.get("memory") if isinstance(raw.get("memory"), dict) else {}
    total = _bytes(raw, "memory_total", "vram_total") or _bytes(memory, "total")
    used = _bytes(raw, "memory_used", "vram_used") or _bytes(memory, "used")
    free = _bytes(raw, "memory_free", "vram_free") or _bytes(memory, "free")
    if used is None and total is not None and free is not None:
        used = total - free
    return DeviceFigures(
        index=_int(raw.get("index"), position),
        name=str(raw.get("name") or "gpu"),
        uuid=str(raw.get("uuid") or ""),
        memory_total_bytes=total,
        memory_used_bytes=used,
        memory_free_bytes=free,
        utilization_pct=_first(raw, "utilization_pct", "gpu_utilization_pct", "utilization", "gpu_util"),
        temperature_c=_first(raw, "temperature_c", "temperature"),
        power_w=_first(raw, "power_w", "power_watts", "power"),
    )


def device_figures(entry: dict[str, Any]) -> tuple[DeviceFigures, ...]:
    """The accelerators in a heartbeat, wherever this worker's version puts them."""
    hardware = entry.get("hardware") if isinstance(entry.get("hardware"), dict) else {}
    for candidates in (entry.get("devices"), hardware.get("devices"), entry.get("gpus"), hardware.get("gpus")):
        if isinstance(candidates, list) and candidates:
            devices = [_device(raw, position) for position, raw in enumerate(candidates)]
            return tuple(device for device in devices if device is not None)
    return ()


def loaded_models(entry: dict[str, Any]) -> tuple[LoadedModel, ...]:
    models = entry.get("models") if isinstance(entry.get("models"), list) else []
    return tuple(
        LoadedModel(
            spec=str(m.get("spec", "")),
            model=str(m.get("model", "")),
            weights_bytes=_int(m.get("weights_bytes")) if _number(m.get("weights_bytes")) is not None else None,
        )
        for m in models
        if isinstance(m, dict)
    )


def worker_figures(entry: dict[str, Any]) -> WorkerFigures:
    """Everything the admin and the metrics show about one worker's latest heartbeat."""
    hardware = entry.get("hardware") if isinstance(entry.get("hardware"), dict) else {}
    load = entry.get("load") if isinstance(entry.get("load"), dict) else {}
    devices = device_figures(entry)
    specs = entry.get("specs") if isinstance(entry.get("specs"), list) else []
    queue_names = entry.get("queues") if isinstance(entry.get("queues"), list) else []
    return WorkerFigures(
        worker_id=str(entry.get("worker_id", "?")),
        hostname=str(entry.get("hostname") or hardware.get("hostname", "")),
        status=str(entry.get("status") or "ready"),
        specs=tuple(map(str, specs)),
        queues=tuple(map(str, queue_names)),
        kind=str(hardware.get("kind") or ("gpu" if devices else "cpu")),
        devices=devices,
        cpu_cores=_int(hardware.get("cpu_cores")) or None,
        memory_total_bytes=_bytes(hardware, "memory_total"),
        memory_available_bytes=_bytes(hardware, "memory_available"),
        running=_int(load.get("running")),
        capacity=_int(load.get("capacity"), 1),
        completed=_int(load.get("completed")),
        failed=_int(load.get("failed")),
        tokens=_int(load.get("tokens")),
        tokens_per_s=_number(load.get("tokens_per_s")),
        started_at=_number(entry.get("started_at")),
        seen_at=_number(entry.get("ts")),
        loaded=loaded_models(entry),
    )
