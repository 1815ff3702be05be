"""Per-device GPU gauges built from heartbeat figures: one definition for the control plane's `/metrics` (every
worker, from the registry) and each worker's own `/metrics`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from farm.heartbeat_figures import DeviceFigures


def gpu_metric_families(*, figures_by_worker: Mapping[str, Sequence[DeviceFigures]]) -> Iterator[Metric]:
    """Per-device GPU gauges (labels worker, gpu index, name), shared with the control plane's `/metrics`."""
    labels = ["worker", "gpu", "name"]
    families = {
        "memory_total_bytes": GaugeMetricFamily(
            "farm_gpu_memory_total_bytes", "GPU memory (VRAM) total.", labels=labels
        ),
        "memory_used_bytes": GaugeMetricFamily("farm_gpu_memory_used_bytes", "GPU memory (VRAM) used.", labels=labels),
        "memory_free_bytes": GaugeMetricFamily("farm_gpu_memory_free_bytes", "GPU memory (VRAM) free.", labels=labels),
        "utilization_pct": GaugeMetricFamily("farm_gpu_utilization_ratio", "GPU utilisation (0-1).", labels=labels),
        "temperature_c": GaugeMetricFamily("farm_gpu_temperature_celsius", "GPU temperature.", labels=labels),
        "power_w": GaugeMetricFamily("farm_gpu_power_watts", "GPU power draw.", labels=labels),
    }
    for worker_id, devices in figures_by_worker.items():
        for device in devices:
            label_values = [worker_id, str(device.index), device.name]
            for field, family in families.items():
                value = getattr(device, field)
                if value is not None:
                    family.add_metric(label_values, value / 100.0 if field == "utilization_pct" else value)
    yield from families.values()
