"""The garbage collector in the farm's long-lived processes: no full collection walks what start-up loaded.

CPython's full (generation 2) collection walks every tracked object. After start-up that is mostly what never
dies: Django, Celery, the URL resolver, the models, the engine's client. Measured on the 2-core CI VM (2026-12-03):
a full collection took ~100 ms in the API process (118k objects at start) and ~115 ms in the control worker, and
under load they ran every ~3 s, stopping the event loop or every task thread for that long: the p99 of
`bench.control_plane` carried them. `freeze_startup` moves what is alive once a process is ready into the
permanent generation (`gc.freeze`, as Instagram's Django fleet does), so later full collections only walk objects
made since: milliseconds. Frozen objects are still freed by reference counting; only cycles among them are not, so
whatever frees a big frozen structure (a model's engine) does it inside `thawed()`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)


def freeze_startup(what: str) -> int:
    """Collects once, then freezes every object alive now; returns how many are frozen in all."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    took_ms = 1e3 * (time.perf_counter() - started)
    log.debug("%s ready: %d objects frozen out of the collector in %.0f ms", what, frozen, took_ms)
    return frozen


@contextlib.contextmanager
def thawed() -> Iterator[None]:
    """Makes frozen objects collectable for the block (something long-lived is being freed), then collects and
    freezes what is left."""
    gc.unfreeze()
    try:
        yield
    finally:
        freeze_startup("thawed block")
