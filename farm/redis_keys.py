"""Every Redis key the farm uses outside the Celery broker, in one place (import-light: workers read it too)."""

from __future__ import annotations

PREFIX = "farm:"

# Live worker registry: one JSON value per worker with a TTL (its heartbeat), plus the set of known ids.
WORKERS_SET = PREFIX + "workers"
# Catalogue of model specs published by the control plane for workers (hash: spec name -> JSON).
SPEC_CATALOG = PREFIX + "specs"
# Seconds a finished job's token stream is kept for late readers.
STREAM_TTL_S = 3600


def worker(worker_id: str) -> str:
    return f"{PREFIX}worker:{worker_id}"


def job_stream(job_id: str) -> str:
    """Per-job Redis stream of token deltas and the final outcome, written by the worker, read by the API."""
    return f"{PREFIX}job:{job_id}:stream"


def job_claim(job_id: str, attempt: int) -> str:
    """Set once (NX) by the worker that runs this attempt: a duplicate delivery loses the claim."""
    return f"{PREFIX}job:{job_id}:claim:{attempt}"


def job_cancel(job_id: str) -> str:
    """Present when the job was cancelled; the worker running it aborts the engine request."""
    return f"{PREFIX}job:{job_id}:cancel"


# Pub/sub channel on which cancellations are announced to every worker (payload: job id).
CANCEL_CHANNEL = PREFIX + "cancel"
# Seconds a cancel marker is kept, so a worker that picks the job up later still sees it.
CANCEL_TTL_S = 24 * 3600
