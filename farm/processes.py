"""Command lines of the farm's processes, used by `manage.py runfarm` and by the tests' live farm, and how they
are started (`spawn_child`)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from farm import queues


def spawn_child(command: Sequence[str], **popen: Any) -> subprocess.Popen:
    """Starts a farm process in a process group of its own (`os.killpg(child.pid, ...)` reaches a worker's vLLM
    engine processes too) that stays in the launcher's session, with stdin closed unless `popen` says otherwise.

    Not a session of its own (`start_new_session`): Linux's autogroup scheduler (`kernel.sched_autogroup_enabled`,
    on by default) shares the CPU between sessions before threads, and with vLLM's compute threads pinned to one core
    a busy engine then kept the control worker runnable but off the CPU for up to 16 s at a time on a 2-core host
    (tests/api/test_batches.py, 2026-12-05: 9 such stalls, 22 s in all, in one run; none with one session)."""
    popen.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(command, process_group=0, **popen)


# Seconds the API keeps an idle keep-alive connection open: longer than clients keep theirs (the openai SDK's httpx
# 5 s, aiohttp 15 s, load balancers 60 s), so the client closes an idle connection first. At uvicorn's default, 5 s,
# a request sent as the server's timer fired was reset; under overload, with the event loop seconds behind, the timers
# ran before the requests already waiting on those connections were read.
API_KEEP_ALIVE_S = 75


def api_command(*, host: str, port: int, workers: int = 1) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "api.asgi:application",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--no-access-log",
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--timeout-graceful-shutdown",
        "5",
        "--timeout-keep-alive",
        str(API_KEEP_ALIVE_S),
    ]


def control_worker_command(*, beat_schedule: str | None = None, concurrency: int = 4) -> list[str]:
    """The Django-enabled control worker; with `beat_schedule` (a file path) it also runs beat (reaper, expiry)."""
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "farm.celery",
        "worker",
        "-Q",
        queues.CONTROL_QUEUE,
        "--pool",
        "threads",
        "--concurrency",
        str(concurrency),
        "--loglevel",
        "INFO",
        "--hostname",
        "control@%h",
        "--without-gossip",
        "--without-mingle",
    ]
    if beat_schedule:
        command += ["--beat", "--schedule", beat_schedule]
    return command


def gpu_worker_command(
    *,
    specs: list[str],
    worker_id: str,
    concurrency: int = 128,
    lazy_specs: Sequence[str] = (),
    memory_gib: float | None = None,
) -> list[str]:
    """An inference worker: `specs` loaded at start, `lazy_specs` on their first request, within `memory_gib`."""
    command = [sys.executable, "-m", "gpu_workers", "--worker-id", worker_id, "--concurrency", str(concurrency)]
    for spec in specs:
        command += ["--spec", spec]
    for spec in lazy_specs:
        command += ["--lazy-spec", spec]
    if memory_gib is not None:
        command += ["--memory-gib", str(memory_gib)]
    return command


def training_worker_command(*, classes: list[str], worker_id: str) -> list[str]:
    """A training worker (`train.<class>` queues; each job in a child process)."""
    command = [sys.executable, "-m", "gpu_workers", "--worker-id", worker_id]
    for name in classes:
        command += ["--train", name]
    return command


def flower_command(*, broker_url: str, port: int, basic_auth: str | None) -> list[str]:
    # Flower parses its own options tornado-style: `--name=value` only.
    command = [
        sys.executable,
        "-m",
        "celery",
        "--broker",
        broker_url,
        "flower",
        f"--port={port}",
        "--address=127.0.0.1",
    ]
    if basic_auth:
        command.append(f"--basic-auth={basic_auth}")
    return command
