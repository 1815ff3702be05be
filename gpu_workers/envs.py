"""Every environment variable a worker reads, typed and commented (vLLM `envs.py` style).

Workers need only the broker URL and their model store: no database credentials, no Django settings.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def _get(name: str, default: str) -> str:
    value = os.environ.get(name)
    return value if value else default


# Broker and data plane (token streams, registry). Same Redis as the control plane.
REDIS_URL: str = _get("REDIS_URL", "redis://127.0.0.1:6390/0")
# Directory holding model weights; spec sources are resolved under it.
FARM_MODEL_DIR: Path = Path(_get("FARM_MODEL_DIR", str(Path(__file__).resolve().parent.parent / "models")))
# Stable id of this worker in the registry (default: host name + pid).
FARM_WORKER_ID: str = _get("FARM_WORKER_ID", f"{socket.gethostname()}-{os.getpid()}")
# Inference jobs in flight at once on this worker, all sharing its engines; vLLM batches them continuously.
FARM_WORKER_CONCURRENCY: int = int(_get("FARM_WORKER_CONCURRENCY", "128"))
# Seconds between heartbeats, and how long a registry entry lives without one.
FARM_HEARTBEAT_S: float = float(_get("FARM_HEARTBEAT_S", "5"))
FARM_WORKER_TTL_S: float = float(_get("FARM_WORKER_TTL_S", "15"))
# KV cache size for CPU engines in GiB (passed to vLLM as VLLM_CPU_KVCACHE_SPACE when unset).
FARM_CPU_KVCACHE_GIB: str = _get("FARM_CPU_KVCACHE_GIB", "2")
# On SIGTERM: seconds running jobs may take to finish before they are aborted and handed back to the queue.
FARM_SHUTDOWN_GRACE_S: float = float(_get("FARM_SHUTDOWN_GRACE_S", "20"))
# Celery task events (task-received/started/succeeded: three broker messages per request) from inference workers,
# for Flower's task views (FARM_WORKER_CONSUMER=celery only: the direct consumer runs no Celery task). Off by
# default: the farm's own job rows and events already record every request, Flower still lists the worker and its
# queues, and the worker's per-request overhead drops (BENCHMARKS.md).
FARM_INFER_TASK_EVENTS: bool = _get("FARM_INFER_TASK_EVENTS", "0") == "1"
# Who takes inference messages off the worker's queues: `direct` (default), a coroutine on the engine loop
# (gpu_workers/queue_consumer.py; needs a Redis 7+ or Valkey broker, else Celery's consumer is used), or `celery`
# (Celery's consumer and thread pool: `tasks.inference`).
FARM_WORKER_CONSUMER: str = _get("FARM_WORKER_CONSUMER", "direct")
# Seconds the interpreter's teardown may take after a clean shutdown before the worker exits regardless.
FARM_EXIT_TIMEOUT_S: float = float(_get("FARM_EXIT_TIMEOUT_S", "5"))
# Consecutive worker-side failures after which the worker quarantines itself (stops consuming, reports unhealthy).
FARM_QUARANTINE_AFTER: int = int(_get("FARM_QUARANTINE_AFTER", "5"))
# Port of this worker's Prometheus `/metrics` endpoint (load, tokens, status, per-GPU figures); 0 turns it off.
FARM_WORKER_METRICS_PORT: int = int(_get("FARM_WORKER_METRICS_PORT", "0"))
# Address the worker's `/metrics` endpoint listens on (0.0.0.0 so Prometheus can scrape it from another host).
FARM_WORKER_METRICS_ADDR: str = _get("FARM_WORKER_METRICS_ADDR", "0.0.0.0")
# Benchmarks of the control plane only: serve every spec with a zero-cost engine (gpu_workers/null_engine.py).
FARM_NULL_ENGINE: bool = _get("FARM_NULL_ENGINE", "0") == "1"
# ... and the seconds it waits between two tokens of one request (0: as fast as the event loop turns).
FARM_NULL_ENGINE_TOKEN_INTERVAL_S: float = float(_get("FARM_NULL_ENGINE_TOKEN_INTERVAL_S", "0"))
# The farm API, for job inputs, adapters and artifacts (workers authenticate with each job's own token).
FARM_API_URL: str = _get("FARM_API_URL", "http://127.0.0.1:8000").rstrip("/")
# Local cache of LoRA adapters fetched for fine-tuned models (one directory per adapter).
FARM_ADAPTER_DIR: Path = Path(_get("FARM_ADAPTER_DIR", str(Path.home() / ".cache" / "farm" / "adapters")))
# Scratch space of training jobs (inputs, outputs); each attempt's directory is removed when it ends.
FARM_TRAIN_WORK_DIR: Path = Path(_get("FARM_TRAIN_WORK_DIR", str(Path.home() / ".cache" / "farm" / "train")))
# Training jobs one training worker runs at once (each in its own child process).
FARM_TRAIN_CONCURRENCY: int = int(_get("FARM_TRAIN_CONCURRENCY", "1"))
# Seconds between progress events a training job sends (the last step and checkpoints always go).
FARM_TRAIN_PROGRESS_EVERY_S: float = float(_get("FARM_TRAIN_PROGRESS_EVERY_S", "1"))
