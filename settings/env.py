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
DATABASE_URL: str = (
    env_str("DATABASE_URL", required_in_production=True) or f"sqlite:///{FARM_HOME / 'farm.sqlite3'}"
)

# Port of the embedded Redis-compatible server that `manage.py runfarm` starts when REDIS_URL is unset.
FARM_EMBEDDED_REDIS_PORT: int = env_int("FARM_EMBEDDED_REDIS_PORT", 6390)
# The broker and data plane. Unset in development: the embedded server started by `manage.py runfarm`.
REDIS_URL_IS_SET: bool = _raw("REDIS_URL") is not None
REDIS_URL: str = (
    env_str("REDIS_URL", required_in_production=True) or f"redis://127.0.0.1:{FARM_EMBEDDED_REDIS_PORT}/0"
)

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
