"""Which engines a worker holds: specs loaded at start, specs loaded on their first request (lazy), and the least
recently used idle ones unloaded when a load needs their memory.

Task threads call `acquire(spec)` around a request. A loaded spec is handed out at once; an unloaded one is loaded
by the first thread that asks (the others for it wait on the same load), after unloading idle specs, least
recently used first, until its memory need fits the worker's budget (`farm.placement.lru_unload`, the pure rule
the placement tests cover). A spec running requests is never unloaded: a load that cannot make room waits for one
to go idle, then gives up with `NoRoom` (the job is handed back to the queue); a request for a spec being loaded
waits for that load, however long it takes. A load that fails raises
`SpecLoadFailed` and the spec is not tried again here for `LOAD_RETRY_S` (the control plane backs it off too).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from farm.placement import LoadedSpec, lru_unload
from gpu_workers.engine import Engine, EngineConfig

log = logging.getLogger(__name__)

# A spec whose load failed is refused here for this long before a new try (a broken spec must not be reloaded
# for every message of its queue; the control plane's back-off steers new requests elsewhere meanwhile).
LOAD_RETRY_S = 30.0


class NoRoom(Exception):
    """The spec does not fit beside the specs busy right now, and none went idle in time."""


class SpecLoadFailed(Exception):
    """The spec's engine could not be loaded on this worker."""


@dataclass
class _Slot:
    config: EngineConfig
    need_bytes: int
    engine: Engine | None = None
    users: int = 0
    last_used: float = 0.0
    loaded_at: float = 0.0
    busy: bool = False  # being loaded or unloaded right now
    failed_at: float = 0.0
    failure: str = ""


class EnginePool:
    def __init__(
        self,
        *,
        configs: dict[str, EngineConfig],
        need_bytes: dict[str, int],
        budget_bytes: int,
        load: Callable[[EngineConfig], Engine],
        unload: Callable[[str, Engine], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._slots = {name: _Slot(config, need_bytes.get(name, 0)) for name, config in configs.items()}
        self.budget_bytes = budget_bytes
        self._load = load
        self._unload = unload
        self._clock = clock
        self._cond = threading.Condition()

    def names(self) -> list[str]:
        """Every spec this worker serves, loaded or not."""
        return list(self._slots)

    def knows(self, spec: str) -> bool:
        """Whether this worker serves `spec` (loaded now or on demand)."""
        return spec in self._slots

    # --- what the heartbeat advertises ------------------------------------------------------------------------

    def loaded(self) -> list[str]:
        with self._cond:
            return [name for name, slot in self._slots.items() if slot.engine is not None]

    def lazy(self) -> list[str]:
        """Specs this worker would load on their first request."""
        with self._cond:
            return [name for name, slot in self._slots.items() if slot.engine is None]

    def loaded_since(self) -> dict[str, float]:
        """spec -> epoch seconds it was loaded at."""
        with self._cond:
            offset = time.time() - self._clock()
            return {name: slot.loaded_at + offset for name, slot in self._slots.items() if slot.engine is not None}

    def used_bytes(self) -> int:
        with self._cond:
            return self._used_bytes()

    def _used_bytes(self) -> int:
        return sum(slot.need_bytes for slot in self._slots.values() if slot.engine is not None or slot.busy)

    # --- loading ----------------------------------------------------------------------------------------------

    def load_now(self, spec: str) -> Engine:
        """Loads a spec at start (unloading nothing); raises `SpecLoadFailed` or `NoRoom`."""
        with self.acquire(spec, wait_s=0.0) as engine:
            return engine

    @contextlib.contextmanager
    def acquire(self, spec: str, *, wait_s: float) -> Iterator[Engine]:
        """The spec's engine, loaded first if need be, held (not unloadable) until the block ends."""
        engine = self.take(spec, wait_s=wait_s)
        try:
            yield engine
        finally:
            self.release(spec)

    def take_loaded(self, spec: str) -> Engine | None:
        """The spec's engine, held as `acquire` holds it, if it is loaded and not being unloaded; else None at once
        (never loads, never waits: the engine loop's own path). `release` it when done."""
        with self._cond:
            slot = self._slots[spec]
            if slot.engine is None or slot.busy:
                return None
            slot.users += 1
            slot.last_used = self._clock()
            return slot.engine

    def release(self, spec: str) -> None:
        """Ends a hold that `take` or `take_loaded` began."""
        with self._cond:
            slot = self._slots[spec]
            slot.users -= 1
            slot.last_used = self._clock()
            self._cond.notify_all()

    def take(self, spec: str, *, wait_s: float) -> Engine:
        """`acquire` without the block: the engine, held until `release`. Blocks while the spec loads."""
        slot = self._slots[spec]
        give_up = self._clock() + wait_s
        with self._cond:
            while True:
                if slot.engine is not None and not slot.busy:
                    slot.users += 1
                    slot.last_used = self._clock()
                    return slot.engine
                if slot.busy:  # its load (or unload) is under way: wait for it, however long a load takes
                    self._cond.wait(timeout=1.0)
                    continue
                if slot.failed_at and self._clock() - slot.failed_at < LOAD_RETRY_S:
                    raise SpecLoadFailed(slot.failure)
                victims = self._room_for(spec)
                if victims is not None:
                    break
                left = give_up - self._clock()
                if left <= 0:
                    busy = [name for name, other in self._slots.items() if other.users or other.busy]
                    raise NoRoom(
                        f"{spec} needs {slot.need_bytes / 2**30:.2f} GiB; {self._used_bytes() / 2**30:.2f} "
                        f"of {self.budget_bytes / 2**30:.2f} GiB are held by busy specs {busy}"
                    )
                self._cond.wait(timeout=min(left, 1.0))
            slot.busy = True
            for name in victims:
                self._slots[name].busy = True
        try:
            for name in victims:
                self._unload_one(name)
            started = self._clock()
            log.info("loading %s on demand%s", spec, f" after unloading {', '.join(victims)}" if victims else "")
            try:
                engine = self._load(slot.config)
            except Exception as exc:
                log.exception("loading %s failed", spec)
                with self._cond:
                    slot.failed_at = self._clock()
                    slot.failure = f"{spec} failed to load: {exc.__class__.__name__}: {exc}"
                raise SpecLoadFailed(slot.failure) from exc
            log.info("%s loaded in %.1fs", spec, self._clock() - started)
            with self._cond:
                slot.engine, slot.loaded_at, slot.failed_at, slot.failure = engine, self._clock(), 0.0, ""
                slot.users += 1
                slot.last_used = self._clock()
                return engine
        finally:
            with self._cond:
                slot.busy = False
                for name in victims:
                    self._slots[name].busy = False
                self._cond.notify_all()

    def _room_for(self, spec: str) -> tuple[str, ...] | None:
        """The idle specs to unload so that `spec` fits (`farm.placement.lru_unload`); None if it cannot fit now."""
        slots = self._slots
        loaded = [
            LoadedSpec(
                spec=name,
                memory_bytes=slot.need_bytes,
                last_used=slot.last_used,
                running=slot.users + (1 if slot.busy else 0),
            )
            for name, slot in slots.items()
            if (slot.engine is not None or slot.busy) and name != spec
        ]
        return lru_unload(loaded, free_bytes=self.budget_bytes - self._used_bytes(), need_bytes=slots[spec].need_bytes)

    def _unload_one(self, name: str) -> None:
        slot = self._slots[name]
        engine = slot.engine
        log.info("unloading %s (least recently used, idle %.0fs) to make room", name, self._clock() - slot.last_used)
        if engine is not None:
            try:
                self._unload(name, engine)
            except Exception:
                log.exception("engine %s did not shut down cleanly", name)
        with self._cond:
            slot.engine = None

    def describe(self) -> dict[str, Any]:
        """Figures for the heartbeat: memory budget and use."""
        with self._cond:
            return {"budget_bytes": self.budget_bytes, "used_bytes": self._used_bytes()}

    def close(self) -> None:
        with self._cond:
            engines = [(name, slot.engine) for name, slot in self._slots.items() if slot.engine is not None]
            for slot in self._slots.values():
                slot.engine = None
        for name, engine in engines:
            try:
                self._unload(name, engine)
            except Exception:
                log.exception("engine %s did not shut down cleanly", name)
