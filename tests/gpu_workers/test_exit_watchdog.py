"""The exit watchdog ends a process whose teardown hangs, with the worker's own exit status and every stack."""

from __future__ import annotations

import subprocess
import sys
import time

SCRIPT = """
import logging, sys, threading
from gpu_workers.exit_watchdog import exit_watchdog_start

logging.basicConfig(level=logging.INFO)
if {stuck}:
    threading.Thread(target=threading.Event().wait, name="stuck-library-thread").start()  # non-daemon: blocks exit
exit_watchdog_start({code}, {timeout})
sys.exit({code})
"""


def run(code: int, timeout_s: float, *, stuck: bool = True) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(code=code, timeout=timeout_s, stuck=stuck)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, time.monotonic() - started


def test_a_hung_teardown_ends_with_the_workers_exit_status_and_its_stacks() -> None:
    result, elapsed = run(code=3, timeout_s=0.5)
    assert result.returncode == 3
    assert 0.5 <= elapsed < 30
    assert "still alive" in result.stderr and "stuck-library-thread" in result.stderr
    assert "Thread 0x" in result.stderr  # faulthandler's dump of every thread


def test_a_clean_exit_is_not_delayed() -> None:
    result, elapsed = run(code=0, timeout_s=30, stuck=False)
    assert result.returncode == 0
    assert elapsed < 25  # the interpreter's start and exit, not the watchdog's 30 s
    assert "still alive" not in result.stderr
