"""Worker rows: the database mirror of the live registry, for the admin and history."""

from __future__ import annotations

from datetime import UTC, datetime

from farm.models import Worker
from farm.registry import LiveWorker, live_workers_sync


def worker_registry_sync() -> list[LiveWorker]:
    """Upserts live workers (their status and last-seen time) and marks silent ones offline. Returns the live."""
    live, gone = live_workers_sync()
    for worker in live:
        entry = worker.raw
        Worker.objects.update_or_create(
            worker_id=worker.worker_id,
            defaults={
                "hostname": entry.get("hostname", ""),
                "specs": list(worker.specs),
                "status": Worker.Status.ONLINE if worker.status == "ready" else worker.status,
                "hardware": entry.get("hardware", {}),
                "load": entry.get("load", {}),
                "started_at": datetime.fromtimestamp(entry.get("started_at", entry["ts"]), tz=UTC),
                "last_seen_at": datetime.fromtimestamp(entry["ts"], tz=UTC),
            },
        )
    live_ids = [w.worker_id for w in live]
    Worker.objects.exclude(status=Worker.Status.OFFLINE).exclude(worker_id__in=live_ids).update(
        status=Worker.Status.OFFLINE
    )
    if gone:
        from farm import redis_keys
        from farm.redis_client import sync_redis

        sync_redis().srem(redis_keys.WORKERS_SET, *gone)
    return live
