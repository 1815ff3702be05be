"""Prometheus metrics of the control plane. Request metrics are counted in-process; fleet and queue figures are
read at scrape time (queue depth from Redis, job states from the database, workers from the registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from farm import queues

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "farm_requests", "API requests by route, model and status.", ["route", "model", "status"], registry=REGISTRY
)
LATENCY = Histogram(
    "farm_request_latency_seconds",
    "API request latency until the response starts.",
    ["route"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TTFT = Histogram(
    "farm_time_to_first_token_seconds",
    "Time from request to first token.",
    ["model"],
    registry=REGISTRY,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
TOKENS = Counter("farm_completion_tokens", "Completion tokens returned, by model.", ["model"], registry=REGISTRY)
RATE_LIMIT_REJECTIONS = Counter(
    "farm_rate_limit_rejections",
    "Requests refused with 429 by a per-key limit, by the limit hit (requests, tokens, quota, too_large).",
    ["reason"],
    registry=REGISTRY,
)


class FleetCollector(Collector):
    """Queue depth per spec queue, jobs per state, live workers per status: read when Prometheus scrapes."""

    def describe(self) -> list:
        """Nothing to read at registration time (the database may not exist yet)."""
        return []

    def collect(self):
        from farm.cluster import jobs_by_status
        from farm.models import ModelSpec
        from farm.redis_client import sync_redis
        from farm.registry import live_workers_sync

        client = sync_redis()
        depth = GaugeMetricFamily("farm_queue_depth", "Messages waiting per queue.", labels=["queue"])
        names = [queues.infer_queue(name) for name in ModelSpec.objects.values_list("name", flat=True)]
        names.append(queues.CONTROL_QUEUE)
        with client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.llen(name)
            for name, length in zip(names, pipe.execute(), strict=True):
                depth.add_metric([name], length)
        yield depth

        states = GaugeMetricFamily("farm_jobs", "Jobs per status.", labels=["status"])
        for status, count in jobs_by_status().items():  # every status, 0 included
            states.add_metric([status], count)
        yield states

        workers = GaugeMetricFamily("farm_workers", "Live workers per status.", labels=["status"])
        counts: dict[str, int] = {}
        for worker in live_workers_sync()[0]:
            counts[worker.status] = counts.get(worker.status, 0) + 1
        for status, count in counts.items():
            workers.add_metric([status], count)
        yield workers


REGISTRY.register(FleetCollector())


class ClusterCollector(Collector):
    """Oldest pending age per queue, tokens/s per worker and per-GPU figures, from the database and heartbeats."""

    def describe(self) -> list:
        return []

    def collect(self):
        from farm.cluster import queue_figures
        from farm.device_metrics import gpu_metric_families
        from farm.heartbeat_figures import worker_figures
        from farm.models import ModelSpec
        from farm.registry import live_workers_sync

        oldest = GaugeMetricFamily(
            "farm_queue_oldest_pending_seconds",
            "Age of the oldest queued job per spec queue (0 when none waits).",
            labels=["queue"],
        )
        for queue in queue_figures(spec_names=list(ModelSpec.objects.values_list("name", flat=True))):
            if queue.spec is not None:
                oldest.add_metric([queue.name], queue.oldest_pending_s or 0.0)
        yield oldest

        workers = [worker_figures(worker.raw) for worker in live_workers_sync()[0]]
        rate = GaugeMetricFamily(
            "farm_worker_tokens_per_second",
            "Completion tokens per second per worker (30 s window, from heartbeats).",
            labels=["worker"],
        )
        running = GaugeMetricFamily("farm_worker_running_jobs", "Jobs running per worker.", labels=["worker"])
        for worker in workers:
            rate.add_metric([worker.worker_id], worker.tokens_per_s or 0.0)
            running.add_metric([worker.worker_id], worker.running)
        yield rate
        yield running
        yield from gpu_metric_families(figures_by_worker={worker.worker_id: worker.devices for worker in workers})


REGISTRY.register(ClusterCollector())


def _register_spec_signals() -> None:
    from farm.fleet_metrics import SpecSignalsCollector

    REGISTRY.register(SpecSignalsCollector())


_register_spec_signals()
