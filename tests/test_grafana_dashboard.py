"""`deploy/grafana/farm.json` is valid Grafana JSON whose every query names a metric the farm exposes (the API's
`/metrics` registry or a worker's own endpoint), so a renamed metric cannot silently blank a panel."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from farm.metrics import REGISTRY
from gpu_workers.metrics import WorkerCollector

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "farm.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "unknown": ("",)}


def exposed_names(families) -> set[str]:
    names = set()
    for family in families:
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


@pytest.mark.django_db
def test_every_panel_queries_an_exposed_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["panels"]
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(exprs) >= 15
    used = {name for expr in exprs for name in re.findall(r"\bfarm_[a-z_]+\b", expr)}
    worker = WorkerCollector(worker_id="w", describe=lambda: {"hardware": {"gpus": []}})
    available = exposed_names(REGISTRY.collect()) | exposed_names(worker.collect())
    assert used <= available, sorted(used - available)
    # the list: queue depth and age, GPU memory/utilisation, job states, TTFT, tokens/s, rate-limit rejections
    for wanted in (
        "farm_queue_depth",
        "farm_queue_oldest_pending_seconds",
        "farm_gpu_memory_used_bytes",
        "farm_gpu_utilization_ratio",
        "farm_jobs",
        "farm_time_to_first_token_seconds_bucket",
        "farm_worker_tokens_per_second",
        "farm_rate_limit_rejections_total",
    ):
        assert wanted in used, wanted
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
