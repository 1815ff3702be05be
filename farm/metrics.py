"""Prometheus metrics of the control plane. Request metrics are counted in-process; fleet and queue figures are
read at scrape time (queue depth from Redis, job states from the database, workers from the registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from farm import queues

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter("farm_requests", "API requests by route, model and status.", ["route", "model", "status"],
                   registry=REGISTRY)
LATENCY = Histogram("farm_request_latency_seconds", "API request latency until the response starts.",
                    ["route"], registry=REGISTRY,
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
TTFT = Histogram("farm_time_to_first_token_seconds", "Time from request to first token.", ["model"],
                 registry=REGISTRY, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
TOKENS = Counter("farm_completion_tokens", "Completion tokens returned, by model.", ["model"], registry=REGISTRY)


class FleetCollector(Collector):
    """Queue depth per spec queue, jobs per state, live workers per status: read when Prometheus scrapes."""

    def describe(self) -> list:
        """Nothing to read at registration time (the database may not exist yet)."""
        return []

    def collect(self):
        from django.db.models import Count

        from farm.models import Job, ModelSpec
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
        for row in Job.objects.values("status").annotate(n=Count("pk")):
            states.add_metric([row["status"]], row["n"])
        yield states

        workers = GaugeMetricFamily("farm_workers", "Live workers per status.", labels=["status"])
        counts: dict[str, int] = {}
        for worker in live_workers_sync()[0]:
            counts[worker.status] = counts.get(worker.status, 0) + 1
        for status, count in counts.items():
            workers.add_metric([status], count)
        yield workers


REGISTRY.register(FleetCollector())
