"""The worker's own Prometheus endpoint (`FARM_WORKER_METRICS_PORT`, off by default): what its heartbeat says,
read at scrape time, so a worker is observable even when the control plane is not."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from farm.device_metrics import gpu_metric_families
from farm.heartbeat_figures import worker_figures

STATUSES = ("ready", "draining", "quarantined")


class WorkerCollector(Collector):
    """Reads `describe()` (the heartbeat's description of this worker) on every scrape."""

    def __init__(self, *, worker_id: str, describe: Callable[[], dict[str, Any]]) -> None:
        self._worker_id = worker_id
        self._describe = describe

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[Metric]:
        figures = worker_figures({**self._describe(), "worker_id": self._worker_id})
        status = GaugeMetricFamily("farm_worker_status", "1 for this worker's current status.", labels=["status"])
        for name in STATUSES:
            status.add_metric([name], 1.0 if figures.status == name else 0.0)
        yield status
        yield GaugeMetricFamily("farm_worker_running_jobs", "Jobs running on this worker.", value=figures.running)
        yield GaugeMetricFamily("farm_worker_capacity", "Concurrent jobs this worker accepts.", value=figures.capacity)
        yield CounterMetricFamily("farm_worker_jobs_completed", "Jobs completed.", value=figures.completed)
        yield CounterMetricFamily(
            "farm_worker_jobs_failed", "Jobs failed by a worker-side fault.", value=figures.failed
        )
        yield CounterMetricFamily("farm_worker_completion_tokens", "Completion tokens generated.", value=figures.tokens)
        yield GaugeMetricFamily(
            "farm_worker_tokens_per_second",
            "Completion tokens per second (30 s window).",
            value=figures.tokens_per_s or 0.0,
        )
        yield from gpu_metric_families(figures_by_worker={self._worker_id: figures.devices})


def start_metrics_server(*, port: int, addr: str, worker_id: str, describe: Callable[[], dict[str, Any]]) -> None:
    """Serves `/metrics` from a daemon thread (prometheus_client's own HTTP server)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(WorkerCollector(worker_id=worker_id, describe=describe))
    start_http_server(port, addr=addr, registry=registry)
