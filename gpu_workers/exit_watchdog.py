"""Bounds the interpreter's teardown once a worker has shut down cleanly.

After Celery's warm shutdown, the hand-backs' flush and the engines' shutdown, nothing is left to do; yet the
interpreter's teardown can still hang on a library's non-daemon thread or `atexit` hook (seen on a loaded CPU host:
10 s and more after vLLM reported `MPClient: complete`). The orchestrator would then SIGKILL the worker after its own
grace period and record a crash. The watchdog dumps every thread's stack (so the hang can be found) and exits with
the worker's own exit status.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time

log = logging.getLogger(__name__)


def exit_watchdog_start(exit_code: int, timeout_s: float) -> threading.Thread:
    """Starts a daemon thread that ends the process with `exit_code` if it is still alive `timeout_s` from now."""

    def watch() -> None:
        time.sleep(timeout_s)
        names = sorted(thread.name for thread in threading.enumerate() if thread is not threading.current_thread())
        log.warning(
            "process still alive %.0fs after a clean shutdown (threads: %s); stacks follow, then exit %d",
            timeout_s,
            ", ".join(names),
            exit_code,
        )
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)

    thread = threading.Thread(target=watch, name="exit-watchdog", daemon=True)
    thread.start()
    return thread
