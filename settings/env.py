"""The one place that reads the control plane's environment.

Every variable is declared here with its type, default and meaning. Values that production must set fail at boot
with a message naming the variable (`FARM_ENV=production`), instead of running with an embedded default.
"""

from __future__ import annotations

import os
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else None


def env_str(name: str, default: str | None = None, *, required_in_production: bool = False) -> str | None:
    """A string variable; `required_in_production` makes it mandatory when FARM_ENV=production."""
    value = _raw(name)
    if value is None and required_in_production and IS_PRODUCTION:
        raise ImproperlyConfigured(f"{name} must be set when FARM_ENV=production (see README, 'Configuration').")
    return value if value is not None else default


def env_bool(name: str, default: bool) -> bool:
    value = _raw(name)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name}={value!r} is not a boolean (use 1/0, true/false).")


def env_int(name: str, default: int) -> int:
    value = _raw(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not an integer.") from None


def env_float(name: str, default: float) -> float:
    value = _raw(name)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not a number.") from None


def env_list(name: str, default: list[str]) -> list[str]:
    value = _raw(name)
    return default if value is None else [item.strip() for item in value.split(",") if item.strip()]


# `development` (embedded defaults, the README's `make run`) or `production` (everything explicit, checked).
FARM_ENV: str = (_raw("FARM_ENV") or "development").lower()
IS_PRODUCTION: bool = FARM_ENV == "production"

# Where the farm keeps its embedded state: SQLite database, embedded Redis socket/data, uploaded files.
FARM_HOME: Path = Path(_raw("FARM_HOME") or BASE_DIR / ".farm")

SECRET_KEY: str = env_str("SECRET_KEY", "dev-insecure-secret-key-change-me", required_in_production=True) or ""
DEBUG: bool = env_bool("DEBUG", not IS_PRODUCTION)
ALLOWED_HOSTS: list[str] = env_list("ALLOWED_HOSTS", [] if IS_PRODUCTION else ["*"])

# PostgreSQL in production (postgres://user:pass@host:5432/db); SQLite under FARM_HOME by default.
DATABASE_URL: str = env_str("DATABASE_URL", required_in_production=True) or f"sqlite:///{FARM_HOME / 'farm.sqlite3'}"

# Port of the embedded Redis-compatible server that `manage.py runfarm` starts when REDIS_URL is unset.
FARM_EMBEDDED_REDIS_PORT: int = env_int("FARM_EMBEDDED_REDIS_PORT", 6390)
# The broker and data plane. Unset in development: the embedded server started by `manage.py runfarm`.
REDIS_URL_IS_SET: bool = _raw("REDIS_URL") is not None
REDIS_URL: str = env_str("REDIS_URL", required_in_production=True) or f"redis://127.0.0.1:{FARM_EMBEDDED_REDIS_PORT}/0"

# Directory holding model weights (one sub-directory per model source), shared by workers.
FARM_MODEL_DIR: Path = Path(_raw("FARM_MODEL_DIR") or BASE_DIR / "models")

FARM_PORT: int = env_int("FARM_PORT", 8000)
FARM_HOST: str = env_str("FARM_HOST", "127.0.0.1") or "127.0.0.1"

# When set, `make run` creates exactly this API key (for scripts), instead of printing a random one.
FARM_BOOTSTRAP_API_KEY: str | None = env_str("FARM_BOOTSTRAP_API_KEY")

# Largest request body the API accepts, in bytes (413 above it).
FARM_MAX_BODY_BYTES: int = env_int("FARM_MAX_BODY_BYTES", 4 * 1024 * 1024)

# Seconds a worker's registry entry lives without a heartbeat; after that it is offline for routing.
FARM_WORKER_TTL_S: float = env_float("FARM_WORKER_TTL_S", 15.0)

# A running job whose worker has not been seen for this long is requeued (or failed) by the reaper.
FARM_JOB_LEASE_S: float = env_float("FARM_JOB_LEASE_S", 60.0)
# A queued job unclaimed this long while its queue is empty is presumed lost by the broker and published again.
FARM_SWEEP_AFTER_S: float = env_float("FARM_SWEEP_AFTER_S", 20.0)
# Seconds between reaper runs (beat).
FARM_REAP_EVERY_S: float = env_float("FARM_REAP_EVERY_S", 10.0)
# Finished jobs older than this many days are deleted by a beat task (0 keeps them forever).
FARM_JOB_TTL_DAYS: float = env_float("FARM_JOB_TTL_DAYS", 30.0)

# Default and maximum seconds an inference request may take end to end (504 after it).
FARM_INFERENCE_TIMEOUT_S: float = env_float("FARM_INFERENCE_TIMEOUT_S", 600.0)

# Seconds an API key lookup is cached in each API process (revocation takes effect within this).
FARM_KEY_CACHE_S: float = env_float("FARM_KEY_CACHE_S", 10.0)

# Flower's basic auth (user:password); empty disables auth in development only.
FLOWER_BASIC_AUTH: str | None = env_str("FLOWER_BASIC_AUTH", required_in_production=True)
FLOWER_PORT: int = env_int("FLOWER_PORT", 5555)

# --- files and batches ------------------------------------------------------------------------------------------------
# Largest file `POST /v1/files` accepts, in bytes (413 above it). Uploads stream to a temporary file past
# FILE_UPLOAD_MAX_MEMORY_SIZE, so this bounds disk, not memory. Only that route gets this limit.
FARM_MAX_UPLOAD_BYTES: int = env_int("FARM_MAX_UPLOAD_BYTES", 512 * 1024 * 1024)
# Django storage backend (dotted class) holding file bytes, and its options as a JSON object. Default: a local
# directory under FARM_HOME. Multi-machine farms: `storages.backends.s3.S3Storage` (pip install django-storages[s3])
# with options such as {"bucket_name": "farm-files", "endpoint_url": "https://s3.example.com"} (README, "Files").
FARM_FILES_STORAGE: str = (
    env_str("FARM_FILES_STORAGE", "django.core.files.storage.FileSystemStorage")
    or "django.core.files.storage.FileSystemStorage"
)
FARM_FILES_STORAGE_OPTIONS: str | None = env_str("FARM_FILES_STORAGE_OPTIONS")
# Most request lines one batch input file may hold (OpenAI's limit).
FARM_BATCH_MAX_LINES: int = env_int("FARM_BATCH_MAX_LINES", 50_000)
# Most line jobs of one batch queued or running at once; the control worker tops the window up as lines finish.
FARM_BATCH_WINDOW: int = env_int("FARM_BATCH_WINDOW", 256)
# A cancelled (or expired) batch waits up to this long for the workers of its running lines to answer the abort:
# a line that finished first keeps its result (`farm.batches`). A worker that died answers nothing; this bounds it.
FARM_BATCH_CANCEL_GRACE_S: float = env_float("FARM_BATCH_CANCEL_GRACE_S", 30.0)


def admin_path(value: str | None, *, production: bool) -> str:
    """URL prefix of the Django admin ("admin/"), or "" for no admin on this process.

    In production the admin is off unless FARM_ADMIN_PATH is set (run it on an internal host or an unguessable
    prefix), and it may never sit under the public API's paths."""
    if value is None:
        return "" if production else "admin/"
    path = value.strip().strip("/")
    if path in ("", "-", "off"):
        return ""
    if not all(part and part.replace("-", "").replace("_", "").isalnum() for part in path.split("/")):
        raise ImproperlyConfigured(f"FARM_ADMIN_PATH={value!r}: use letters, digits, '-', '_' and '/'.")
    if path.split("/")[0] in ("v1", "api", "metrics", "healthz", "readyz"):
        raise ImproperlyConfigured(f"FARM_ADMIN_PATH={value!r} is on the public API path; pick another prefix.")
    return path + "/"


# URL prefix of the admin (dashboard, jobs, workers, keys). Development: `admin/`; production: off unless set.
FARM_ADMIN_PATH: str = admin_path(_raw("FARM_ADMIN_PATH"), production=IS_PRODUCTION)
# Where operators open Flower (linked from the admin); default: the one `make run` starts.
FLOWER_URL: str = env_str("FLOWER_URL", f"http://127.0.0.1:{FLOWER_PORT}/") or ""

# --- fine-tuning and eval-loss (farm.fine_tuning) --------------------------------------------------------------------
# GPU hardware classes training jobs are placed on (name=GiB of GPU memory); each is a `train.<name>` queue that
# `python -m gpu_workers --train <name>` consumes. A job goes to the smallest class its estimate fits, else `cpu`.
FARM_TRAIN_CLASSES: str = env_str("FARM_TRAIN_CLASSES", "gpu-24gb=24,gpu-48gb=48,gpu-80gb=80") or ""
# Longest a training or eval-loss job may run (the worker kills its child process after it: `timed_out`).
FARM_TRAIN_TIMEOUT_S: float = env_float("FARM_TRAIN_TIMEOUT_S", 24 * 3600.0)
# Secret of the job-scoped tokens workers use to download a job's inputs and upload its artifacts (HMAC).
# Default: derived from SECRET_KEY (a different salt), so one secret is enough in small farms.
FARM_JOB_TOKEN_SECRET: str = env_str("FARM_JOB_TOKEN_SECRET", SECRET_KEY) or SECRET_KEY
# Largest artifact (LoRA adapter archive) a worker may upload, in bytes.
FARM_MAX_ARTIFACT_BYTES: int = env_int("FARM_MAX_ARTIFACT_BYTES", 2 * 1024 * 1024 * 1024)

# --- per-key rate limits (farm.rate_limits) ---------------------------------------------------------------------------
# Longest an over-limit request of a key with `on_limit=wait` waits for room before its 429, in seconds.
FARM_RATE_LIMIT_MAX_WAIT_S: float = env_float("FARM_RATE_LIMIT_MAX_WAIT_S", 30.0)
# Completion tokens reserved against TPM/quota for a request without `max_tokens` (and no key cap); settled after.
FARM_RATE_LIMIT_DEFAULT_MAX_TOKENS: int = env_int("FARM_RATE_LIMIT_DEFAULT_MAX_TOKENS", 1024)

# --- fleet routing and overload (farm.routing, farm.inference) -------------------------------------------------------
# A model whose live replicas are all saturated answers 429 (Retry-After) once each spec's queue holds more than this
# many messages; -1 never refuses (requests queue until their deadline).
FARM_OVERLOAD_QUEUE_BOUND: int = env_int("FARM_OVERLOAD_QUEUE_BOUND", 256)
# Retry-After (seconds) of that 429.
FARM_OVERLOAD_RETRY_AFTER_S: int = env_int("FARM_OVERLOAD_RETRY_AFTER_S", 2)
# A queued job waiting this many seconds on a spec with no live replica is moved to a live spec of its model (as a new
# attempt, bounded by the job's attempts; farm.failover). A retried job always goes to the next live spec.
FARM_FAILOVER_AFTER_S: float = env_float("FARM_FAILOVER_AFTER_S", 2.0)

# -- production hardening (FARM_ENV=production; see deploy/README.md) --------------------------------------------------
# The API sits behind a TLS-terminating proxy or ingress that sets X-Forwarded-Proto: trust it for "is this HTTPS?".
# Turn off only when clients reach the API directly (then it must terminate TLS itself).
FARM_TLS_PROXY: bool = env_bool("FARM_TLS_PROXY", IS_PRODUCTION)
# Redirect plain-HTTP requests to HTTPS (health, readiness and metrics stay reachable over HTTP for probes and
# Prometheus). Off only where in-cluster clients call the API over plain HTTP on purpose.
FARM_SSL_REDIRECT: bool = env_bool("FARM_SSL_REDIRECT", IS_PRODUCTION)
# Strict-Transport-Security max-age in seconds (0 disables the header), and whether to ask for browser preloading.
FARM_HSTS_SECONDS: int = env_int("FARM_HSTS_SECONDS", 31_536_000 if IS_PRODUCTION else 0)
FARM_HSTS_PRELOAD: bool = env_bool("FARM_HSTS_PRELOAD", IS_PRODUCTION)
# Origins the admin's forms may be posted from when the proxy rewrites the Host (e.g. https://farm.example.com).
CSRF_TRUSTED_ORIGINS: list[str] = env_list("CSRF_TRUSTED_ORIGINS", [])
if IS_PRODUCTION and not ALLOWED_HOSTS:
    raise ImproperlyConfigured("ALLOWED_HOSTS must be set when FARM_ENV=production (the API's public host names).")
if IS_PRODUCTION and (len(SECRET_KEY) < 50 or len(set(SECRET_KEY)) < 5):
    raise ImproperlyConfigured("SECRET_KEY must be a random value of at least 50 characters in production.")
