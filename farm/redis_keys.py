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


def stream_hub_wakeup(hub_id: str) -> str:
    """An API process' wake-up stream: a new reader XADDs to it to end the hub's blocked XREAD (`farm.stream_hub`)."""
    return f"{PREFIX}stream-hub:{hub_id}"


def job_claim(job_id: str, attempt: int) -> str:
    """Set once (NX) by the worker that runs this attempt: a duplicate delivery loses the claim."""
    return f"{PREFIX}job:{job_id}:claim:{attempt}"


def job_cancel(job_id: str) -> str:
    """Present when the job was cancelled; the worker running it aborts the engine request."""
    return f"{PREFIX}job:{job_id}:cancel"


# Hash the reaper keeps across runs: "<job id>:<attempt>" -> epoch seconds when a live worker was first seen not
# running a job the database says it runs (its outcome event may still be on its way).
REAPER_SUSPECTS = PREFIX + "reaper:suspects"
# The same for queued jobs whose attempt a live worker claimed but does not run (a claim whose reply was lost).
REAPER_CLAIM_SUSPECTS = PREFIX + "reaper:claim-suspects"
# Held while a reaper run is in progress: one run at a time across control workers (`farm.reaper.jobs_reap`).
REAPER_LOCK = PREFIX + "reaper:lock"

# Pub/sub channel on which cancellations are announced to every worker (payload: job id).
CANCEL_CHANNEL = PREFIX + "cancel"
# Seconds a cancel marker is kept, so a worker that picks the job up later still sees it.
CANCEL_TTL_S = 24 * 3600

# Pub/sub channel on which the control plane tells one worker to drain, quarantine or resume (JSON payload
# {"worker_id", "action"}); the worker reports its new status in its next heartbeat.
WORKER_CONTROL_CHANNEL = PREFIX + "worker-control"
WORKER_ACTIONS = ("drain", "quarantine", "resume")


def batch_tick_pending(batch_id: str) -> str:
    """Set (NX) when a tick of this batch is already scheduled: many lines ending at once schedule one tick."""
    return f"{PREFIX}batch:{batch_id}:tick"


def batch_lock(batch_id: str) -> str:
    """Held by the control-worker thread advancing this batch: one tick at a time per batch."""
    return f"{PREFIX}batch:{batch_id}:lock"


# --- per-key rate limits (farm.rate_limits); `{key_id}` hash tag keeps one key's counters on one cluster slot -------
def rate_limit_bucket(key_id: int, kind: str) -> str:
    """Token bucket (hash: level, ts) of one API key's `requests` or `tokens` per minute."""
    return f"{PREFIX}rl:{{{key_id}}}:{kind}"


def rate_limit_quota(key_id: int, period_id: str) -> str:
    """Tokens one API key used in one quota period (`2026-11-23` or `2026-11`)."""
    return f"{PREFIX}rl:{{{key_id}}}:quota:{period_id}"


# --- fleet routing (farm.spec_health) -------------------------------------------------------------------------------
# Hash: spec name -> epoch seconds until which routing skips the spec (it failed; the back-off grows per failure).
SPEC_BACKOFF = PREFIX + "spec-backoff"


def spec_failures(spec_name: str) -> str:
    """Counter of a spec's recent failures (expires `BackoffPolicy.reset_after_s` after the last one)."""
    return f"{PREFIX}spec:{spec_name}:failures"


def spec_failure_cause(spec_name: str, cause: str) -> str:
    """Marks one cause (a dead worker) as counted against a spec, so its many jobs count as one failure."""
    return f"{PREFIX}spec:{spec_name}:failure-cause:{cause}"


# Hash: cache job id -> JSON progress of a model cache job (farm.model_cache).
MODEL_CACHE_JOBS = PREFIX + "model-cache-jobs"
