"""Admin pages beyond the model lists: the cluster overview (with worker drain/quarantine/resume buttons) and the
usage charts. Thin views: they read `farm.cluster` / `farm.usage_report` and call `farm.worker_control`."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

from django.contrib import admin, messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from farm.cluster import ClusterOverview, cluster_overview, heartbeat_age_s
from farm.errors import FarmError
from farm.heartbeat_figures import WorkerFigures
from farm.models import JobStatus
from farm.worker_control import worker_control_send

_GIB = 2**30
STATUS_COLOURS = {
    JobStatus.QUEUED: "#6b7280",
    JobStatus.RUNNING: "#2563eb",
    JobStatus.SUCCEEDED: "#16a34a",
    JobStatus.FAILED: "#dc2626",
    JobStatus.CANCELED: "#a16207",
    JobStatus.TIMED_OUT: "#9333ea",
}


def _bar(pct: float | None) -> float:
    return round(max(0.0, min(100.0, pct or 0.0)), 1)


def _gib(value: int | None) -> str:
    return "?" if value is None else f"{value / _GIB:.1f}"


def _worker_row(worker: WorkerFigures) -> dict[str, Any]:
    devices = [
        {
            "index": d.index,
            "name": d.name,
            "memory_pct": _bar(d.memory_used_pct),
            "memory": f"{_gib(d.memory_used_bytes)} / {_gib(d.memory_total_bytes)} GiB",
            "util_pct": _bar(d.utilization_pct),
            "util_known": d.utilization_pct is not None,
            "temperature_c": d.temperature_c,
            "power_w": d.power_w,
        }
        for d in worker.devices
    ]
    memory_pct = None
    if worker.memory_total_bytes and worker.memory_available_bytes is not None:
        memory_pct = 100.0 * (1 - worker.memory_available_bytes / worker.memory_total_bytes)
    return {
        "figures": worker,
        "devices": devices,
        "load_pct": _bar(worker.load_pct),
        "ram_pct": _bar(memory_pct),
        "ram": f"{_gib(worker.memory_total_bytes)} GiB",
        "heartbeat_age_s": heartbeat_age_s(worker),
        "loaded": [{"spec": m.spec, "weights": _gib(m.weights_bytes)} for m in worker.loaded],
        "actions": [a for a in ("drain", "quarantine", "resume") if (a == "resume") != (worker.status == "ready")],
    }


def _overview_context(overview: ClusterOverview) -> dict[str, Any]:
    total_jobs = sum(overview.jobs_by_status.values()) or 1
    deepest = max((q.depth for q in overview.queues), default=0) or 1
    return {
        "overview": overview,
        "worker_rows": [_worker_row(worker) for worker in overview.workers],
        "queue_rows": [{"queue": q, "pct": _bar(100.0 * q.depth / deepest)} for q in overview.queues],
        "status_rows": [
            {
                "status": status,
                "count": count,
                "pct": _bar(100.0 * count / total_jobs),
                "colour": STATUS_COLOURS.get(status, "#6b7280"),
            }
            for status, count in overview.jobs_by_status.items()
        ],
        "queued_jobs": overview.jobs_by_status.get(JobStatus.QUEUED, 0),
        "running_jobs": overview.jobs_by_status.get(JobStatus.RUNNING, 0),
    }


@require_GET
def cluster_view(request: HttpRequest) -> HttpResponse:
    """Workers, models and replicas, queues, jobs per state, tokens/s: one page, refreshed every 15 s."""
    context = {
        **admin.site.each_context(request),
        "title": "Cluster overview",
        "refresh_s": 0 if request.GET.get("refresh") == "0" else 15,
        **_overview_context(cluster_overview()),
    }
    return TemplateResponse(request, "admin/farm/cluster.html", context)


@require_POST
def worker_action_view(request: HttpRequest, worker_id: str, action: str) -> HttpResponse:
    """Drain, quarantine or resume one live worker (a form button on the overview)."""
    try:
        listeners = worker_control_send(worker_id=worker_id, action=action, by=f"admin:{request.user.get_username()}")
    except FarmError as exc:
        messages.error(request, exc.message)
    else:
        if listeners:
            messages.success(request, f"Sent {action} to {worker_id}; its status changes with its next heartbeat.")
        else:  # pub/sub keeps nothing: a worker reconnecting to Redis right now misses it
            messages.warning(request, f"No worker is listening for commands right now; {action} was not delivered.")
    return HttpResponseRedirect(reverse("admin:farm_cluster"))


def _parse_day(value: str | None, default: date) -> date:
    try:
        return date.fromisoformat(value) if value else default
    except ValueError:
        return default


@require_GET
def usage_view(request: HttpRequest) -> HttpResponse:
    """Tokens and requests per day (stacked by model) over a date range, optionally for one user or key."""
    from farm.usage_report import usage_report

    today = timezone.now().date()
    end = _parse_day(request.GET.get("end"), today)
    start = _parse_day(request.GET.get("start"), end - timedelta(days=29))
    if start > end:
        start, end = end, start
    start = max(start, end - timedelta(days=366))
    report = usage_report(
        start=start, end=end, username=request.GET.get("user") or None, key_prefix=request.GET.get("key") or None
    )
    context = {
        **admin.site.each_context(request),
        "title": "Usage",
        "report": report,
        "start": start.isoformat(),
        "end": end.isoformat(),
        "user": request.GET.get("user", ""),
        "key": request.GET.get("key", ""),
    }
    return TemplateResponse(request, "admin/farm/usage.html", context)
