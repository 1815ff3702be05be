"""Scale-up signals per spec for Prometheus (and KEDA through it): jobs pending over two minutes, live replicas,
back-off. Queue depth and oldest pending age per spec queue are in `farm.metrics` (`farm_queue_depth`,
`farm_queue_oldest_pending_seconds`). Read at scrape time."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# A job waiting longer than this is the "scale up" signal (the "pending > 2 min").
PENDING_TOO_LONG_S = 120.0


def spec_scale_signals(*, now: float | None = None) -> dict[str, dict[str, float]]:
    """spec -> {pending_over_2m, live_replicas, backoff_s} for every enabled spec."""
    from django.db.models import Count
    from django.utils import timezone

    from farm.models import Job, JobStatus, ModelSpec
    from farm.registry import live_workers_sync
    from farm.spec_health import spec_backoffs_sync

    now = time.time() if now is None else now
    specs = list(ModelSpec.objects.filter(enabled=True).values_list("name", flat=True))
    cutoff = timezone.now() - timedelta(seconds=PENDING_TOO_LONG_S)
    late = dict(
        Job.objects.filter(status=JobStatus.QUEUED, spec__isnull=False, dispatched_at__lt=cutoff)
        .values("spec__name")
        .annotate(n=Count("pk"))
        .values_list("spec__name", "n")
    )
    replicas: dict[str, int] = {}
    for worker in live_workers_sync()[0]:
        if worker.accepts_work and worker.fresh(now):
            for spec in worker.specs:
                replicas[spec] = replicas.get(spec, 0) + 1
    backoffs = spec_backoffs_sync()
    return {
        spec: {
            "pending_over_2m": float(late.get(spec, 0)),
            "live_replicas": float(replicas.get(spec, 0)),
            "backoff_s": max(0.0, backoffs.get(spec, 0.0) - now),
        }
        for spec in specs
    }


def model_scale_signals() -> dict[str, dict[str, float]]:
    """model -> {queue_depth, pending_over_2m}: the demand of a public model name over all its specs. A spec scaled
    to zero gets no requests (routing only picks live specs), so its own queue never asks for a first replica; the
    model's total demand does (deploy/k8s/keda.yaml scales GPU specs from zero on it)."""
    from django.db.models import Count
    from django.utils import timezone

    from farm.models import Job, JobStatus, ModelSpec
    from farm.spec_health import queue_depths_sync

    specs = list(ModelSpec.objects.filter(enabled=True, model__enabled=True).values_list("name", "model__name"))
    depths = queue_depths_sync([name for name, _ in specs])
    cutoff = timezone.now() - timedelta(seconds=PENDING_TOO_LONG_S)
    late = dict(
        Job.objects.filter(status=JobStatus.QUEUED, model__isnull=False, dispatched_at__lt=cutoff)
        .values("model__name")
        .annotate(n=Count("pk"))
        .values_list("model__name", "n")
    )
    figures: dict[str, dict[str, float]] = {}
    for spec, model in specs:
        entry = figures.setdefault(model, {"queue_depth": 0.0, "pending_over_2m": float(late.get(model, 0))})
        entry["queue_depth"] += depths[spec]
    return figures


class SpecSignalsCollector(Collector):
    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        late = GaugeMetricFamily(
            "farm_spec_pending_over_2m",
            "Queued jobs of a spec waiting over 2 minutes (scale-up signal).",
            labels=["spec"],
        )
        replicas = GaugeMetricFamily("farm_spec_live_replicas", "Live workers taking work per spec.", labels=["spec"])
        backoff = GaugeMetricFamily(
            "farm_spec_backoff_seconds",
            "Seconds left of a spec's failure back-off (routing skips it meanwhile).",
            labels=["spec"],
        )
        for spec, figures in spec_scale_signals().items():
            late.add_metric([spec], figures["pending_over_2m"])
            replicas.add_metric([spec], figures["live_replicas"])
            backoff.add_metric([spec], figures["backoff_s"])
        yield late
        yield replicas
        yield backoff

        depth = GaugeMetricFamily(
            "farm_model_queue_depth",
            "Messages waiting over all specs of a public model (scale from zero signal).",
            labels=["model"],
        )
        model_late = GaugeMetricFamily(
            "farm_model_pending_over_2m", "Queued jobs of a model waiting over 2 minutes.", labels=["model"]
        )
        for model, figures in model_scale_signals().items():
            depth.add_metric([model], figures["queue_depth"])
            model_late.add_metric([model], figures["pending_over_2m"])
        yield depth
        yield model_late
