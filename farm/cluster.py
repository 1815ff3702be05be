"""The cluster overview: live workers (from their heartbeats), models and their live replicas, queue depths and
oldest pending age per queue, jobs per state, tokens/s. Read-only; the admin page and `/metrics` use it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime

from django.db.models import Count, Min
from django.utils import timezone

from farm import queues
from farm.heartbeat_figures import WorkerFigures, worker_figures
from farm.models import Job, JobStatus, ModelSpec, Worker
from farm.redis_client import sync_redis
from farm.registry import live_workers_sync


@dataclass(frozen=True)
class QueueFigures:
    name: str
    spec: str | None  # None for the control queue
    depth: int
    oldest_pending_s: float | None  # age of the oldest queued job of this spec (since its attempt was published)


@dataclass(frozen=True)
class SpecReplicas:
    model: str
    spec: str
    engine: str
    resource_profile: str
    enabled: bool
    min_replicas: int
    weight: int
    ready: int  # live workers serving it that accept work
    other: int  # live workers serving it that are draining or quarantined

    @property
    def below_min(self) -> bool:
        return self.enabled and self.ready < self.min_replicas


@dataclass(frozen=True)
class ClusterOverview:
    workers: list[WorkerFigures]
    offline_workers: list[Worker]
    replicas: list[SpecReplicas]
    queues: list[QueueFigures]
    jobs_by_status: dict[str, int]
    generated_at: datetime = field(default_factory=timezone.now)

    @property
    def tokens_per_s(self) -> float:
        return sum(worker.tokens_per_s or 0.0 for worker in self.workers)

    @property
    def running_jobs(self) -> int:
        return sum(worker.running for worker in self.workers)


def queue_figures(*, spec_names: list[str]) -> list[QueueFigures]:
    """Depth (Redis LLEN of the broker list) of each spec's queue and the control queue, and the age of each
    spec's oldest queued job (from the database: Celery messages carry no publish time)."""
    names = [queues.infer_queue(spec) for spec in spec_names] + [queues.CONTROL_QUEUE]
    with sync_redis().pipeline(transaction=False) as pipe:
        for name in names:
            pipe.llen(name)
        depths = pipe.execute()
    oldest = dict(
        Job.objects.filter(status=JobStatus.QUEUED, spec__isnull=False)
        .values("spec__name")
        .annotate(oldest=Min("dispatched_at"))
        .values_list("spec__name", "oldest")
    )
    now = timezone.now()
    figures = []
    for name, depth, spec in zip(names, depths, [*spec_names, None], strict=True):
        since = oldest.get(spec) if spec else None
        age = max(0.0, (now - since).total_seconds()) if since else None
        figures.append(QueueFigures(name=name, spec=spec, depth=int(depth), oldest_pending_s=age))
    return figures


def jobs_by_status() -> dict[str, int]:
    """Every job status with its count (0 included, so charts and alerts see a state empty out)."""
    counts = dict.fromkeys(JobStatus.values, 0)
    for row in Job.objects.values("status").annotate(n=Count("pk")):
        counts[row["status"]] = row["n"]
    return counts


def cluster_overview() -> ClusterOverview:
    live, _ = live_workers_sync()
    workers = sorted((worker_figures(worker.raw) for worker in live), key=lambda w: w.worker_id)
    live_ids = {worker.worker_id for worker in workers}
    specs = list(ModelSpec.objects.select_related("model").order_by("model__name", "name"))
    replicas = []
    for spec in specs:
        serving = [worker for worker in workers if spec.name in worker.specs]
        ready = sum(1 for worker in serving if worker.status == "ready")
        replicas.append(
            SpecReplicas(
                model=spec.model.name,
                spec=spec.name,
                engine=spec.engine,
                resource_profile=spec.resource_profile,
                enabled=spec.enabled and spec.model.enabled,
                min_replicas=spec.min_replicas,
                weight=spec.weight,
                ready=ready,
                other=len(serving) - ready,
            )
        )
    offline = [w for w in Worker.objects.order_by("-last_seen_at")[:50] if w.worker_id not in live_ids]
    return ClusterOverview(
        workers=workers,
        offline_workers=offline,
        replicas=replicas,
        queues=queue_figures(spec_names=[spec.name for spec in specs]),
        jobs_by_status=jobs_by_status(),
    )


def heartbeat_age_s(worker: WorkerFigures, now: float | None = None) -> float | None:
    """Seconds since the worker's last heartbeat."""
    if worker.seen_at is None:
        return None
    return max(0.0, (time.time() if now is None else now) - worker.seen_at)
