"""The fleet as the API and the admin show it: every live worker's latest heartbeat (hardware, loaded models, load),
plus the workers the database remembers that went silent, shown `offline`."""

from __future__ import annotations

import time
from typing import Any

from farm.models import Worker
from farm.registry import live_workers_sync


def _offline(worker: Worker) -> dict[str, Any]:
    return {
        "id": worker.worker_id,
        "object": "worker",
        "status": "offline",
        "hostname": worker.hostname,
        "specs": list(worker.specs or []),
        "hardware": worker.hardware or {},
        "load": worker.load or {},
        "models": [],
        "heartbeat_age_s": None,
        "last_seen_at": int(worker.last_seen_at.timestamp()) if worker.last_seen_at else None,
        "started_at": int(worker.started_at.timestamp()) if worker.started_at else None,
    }


def fleet_workers(*, include_offline: bool = True) -> list[dict[str, Any]]:
    """Live workers from the registry (a worker that missed three heartbeats is `offline` already, before its entry
    expires), then the remembered ones that are not live. Sorted by id."""
    now = time.time()
    live, _ = live_workers_sync()
    shown: dict[str, dict[str, Any]] = {}
    for worker in live:
        entry = worker.raw
        shown[worker.worker_id] = {
            "id": worker.worker_id,
            "object": "worker",
            "status": worker.status if worker.fresh(now) else "offline",
            "hostname": entry.get("hostname", ""),
            "specs": list(worker.specs),
            "hardware": entry.get("hardware", {}),
            "load": entry.get("load", {}),
            "models": entry.get("models", []),
            "heartbeat_age_s": round(now - worker.seen_at, 2) if worker.seen_at else None,
            "last_seen_at": int(worker.seen_at) if worker.seen_at else None,
            "started_at": int(entry["started_at"]) if isinstance(entry.get("started_at"), int | float) else None,
        }
    if include_offline:
        for row in Worker.objects.exclude(worker_id__in=list(shown)):
            shown[row.worker_id] = _offline(row)
    return [shown[worker_id] for worker_id in sorted(shown)]


def hardware_summary(hardware: dict[str, Any]) -> str:
    """One line per host for the admin: each GPU's name, VRAM used/total, utilisation, temperature, power; or the
    CPU's cores, RAM and ISA flags."""
    gpus = hardware.get("gpus") or []
    if gpus:
        parts = []
        for gpu in gpus:
            used, total = gpu.get("memory_used_mib"), gpu.get("memory_total_mib")
            text = f"{gpu.get('name', 'GPU')}"
            if isinstance(used, int | float) and isinstance(total, int | float):
                text += f" {used / 1024:.1f}/{total / 1024:.0f} GiB"
            for key, unit in (("utilization_pct", "%"), ("temperature_c", "°C"), ("power_w", " W")):
                if isinstance(gpu.get(key), int | float):
                    text += f" {gpu[key]:.0f}{unit}"
            parts.append(text)
        return "; ".join(parts)
    if not hardware:
        return "-"
    ram = hardware.get("memory_total_mib")
    flags = " ".join(hardware.get("cpu_flags") or [])
    ram_text = f", {ram / 1024:.0f} GiB RAM" if isinstance(ram, int | float) else ""
    return f"CPU: {hardware.get('cpu_cores', '?')} cores{ram_text}" + (f" ({flags})" if flags else "")


def load_summary(load: dict[str, Any]) -> str:
    """`running/capacity running, N queued, T tok/s` for the admin."""
    if not load:
        return "-"
    text = f"{load.get('running', 0)}/{load.get('capacity', '?')} running"
    if isinstance(load.get("queued"), int):
        text += f", {load['queued']} queued"
    if isinstance(load.get("tokens_per_s"), int | float):
        text += f", {load['tokens_per_s']:.0f} tok/s"
    return text
