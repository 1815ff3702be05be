"""Pytest plugin (`-p tests.services`, loaded before Django): the services the suite needs.

- REDIS_URL set (CI: the machine's Redis): tests use it, on the database number it names, flushed per session.
- REDIS_URL unset (embedded default): an embedded Valkey is started on a free port for the session.
- DATABASE_URL set: PostgreSQL (pytest-django creates `test_<name>`); unset: SQLite under FARM_HOME.
"""

from __future__ import annotations

import atexit
import os
import socket
import tempfile
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_embedded_redis() -> None:
    from farm.embedded_redis import start_embedded_redis

    port = free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="farm-test-redis-"))
    process = start_embedded_redis(port=port, data_dir=data_dir, log_file=data_dir / "redis.log")
    atexit.register(process.terminate)
    os.environ["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"


os.environ.setdefault("FARM_HOME", str(Path(__file__).resolve().parent.parent / ".farm" / "test-home"))
if not os.environ.get("REDIS_URL"):
    _start_embedded_redis()
