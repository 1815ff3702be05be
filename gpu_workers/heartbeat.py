"""Advertises this worker in the live registry: hardware, specs served, load. A key with a TTL per worker.

The registry entry (`farm:worker:<id>`, a plain JSON document; `farm.heartbeat_figures` and `farm.fleet` read it):

    worker_id      str     registry id (`--worker-id`)
    ts             float   epoch seconds of this heartbeat
    heartbeat_s    float   seconds between heartbeats (routing treats 3 missed ones as down)
    hostname       str
    status         str     ready | draining | quarantined
    specs          [str]   specs loaded and serving;  queues: [str] the `infer.<spec>` queues it consumes
    lazy_specs     [str]   specs it serves but has not loaded: loaded on their first request (`--lazy-spec`, or
                           unloaded since as the least recently used)
    memory         {}      budget_bytes (what its engines may use), used_bytes (the loaded specs' estimated need)
    running_jobs   [str]   job ids running here now
    started_at     float   epoch seconds the worker started
    hardware       {}      `gpu_workers.hardware.HardwareReport.as_dict()`:
                           kind (gpu | cpu), hostname, driver, cpu_cores, memory_total_mib, memory_available_mib,
                           cpu_flags (ISA: avx2, avx512f, amx_bf16...), gpus: [{index, name, uuid,
                           memory_total_mib, memory_free_mib, memory_used_mib, utilization_pct, temperature_c,
                           power_w}] (NVML; re-read at every heartbeat on GPU hosts)
    models         [{}]    loaded models: {spec, model, source, engine, weights_bytes (safetensors headers; null if
                           unknown), loaded_at}
    load           {}      running, capacity (concurrent requests), queued (messages waiting in this worker's
                           queues), completed, failed, tokens, consecutive_failures, tokens_per_s (last 30 s)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import redis

from farm import redis_keys

log = logging.getLogger(__name__)


def loaded_model_entries(
    specs: dict[str, dict[str, Any]], *, model_dir: Path, loaded_at: float
) -> list[dict[str, Any]]:
    """The heartbeat's `models`: one entry per loaded spec, its weights sized from the safetensors headers once."""
    from farm.model_weights import WeightsUnknown, weights_bytes
    from gpu_workers.model_store import model_path

    entries = []
    for name, spec in specs.items():
        try:
            size: int | None = weights_bytes(model_path(model_dir, spec["source"]))
        except (WeightsUnknown, OSError, ValueError):
            size = None
        entries.append(
            {
                "spec": name,
                "model": spec.get("model", ""),
                "source": spec["source"],
                "engine": spec.get("engine", ""),
                "weights_bytes": size,
                "loaded_at": loaded_at,
            }
        )
    return entries


def queued_messages(client: redis.Redis, queue_names: list[str]) -> int:
    """Messages waiting in these queues (Celery's Redis lists); 0 when Redis does not answer."""
    try:
        with client.pipeline(transaction=False) as pipe:
            for queue in queue_names:
                pipe.llen(queue)
            return sum(int(n) for n in pipe.execute())
    except redis.RedisError:
        return 0


class Heartbeat:
    def __init__(
        self,
        *,
        client: redis.Redis,
        worker_id: str,
        interval_s: float,
        ttl_s: float,
        describe: Callable[[], dict[str, Any]],
    ) -> None:
        self._client = client
        self._worker_id = worker_id
        self._interval_s = interval_s
        self._ttl_s = ttl_s
        self._describe = describe
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def beat(self) -> None:
        entry = {**self._describe(), "worker_id": self._worker_id, "ts": time.time(), "heartbeat_s": self._interval_s}
        with self._client.pipeline(transaction=False) as pipe:
            pipe.set(redis_keys.worker(self._worker_id), orjson.dumps(entry), px=int(self._ttl_s * 1000))
            pipe.sadd(redis_keys.WORKERS_SET, self._worker_id)
            pipe.execute()

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.beat()
            except redis.RedisError as exc:  # a broker blip must not kill the worker; the next beat retries
                log.warning("heartbeat failed: %s", exc)

    def stop(self) -> None:
        """Stops beating and leaves the registry at once, so routing stops sending work here."""
        self._stop.set()
        try:
            self._client.delete(redis_keys.worker(self._worker_id))
            self._client.srem(redis_keys.WORKERS_SET, self._worker_id)
        except redis.RedisError:
            log.warning("could not remove %s from the registry; its entry expires by TTL", self._worker_id)
