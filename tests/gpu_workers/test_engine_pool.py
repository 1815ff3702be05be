"""`EnginePool`: lazy loads, least-recently-used unloads, busy specs kept, failed loads refused for a while.

The pool's own logic, with engines as plain objects and a settable clock (the live path, real vLLM engines loaded
and unloaded on a worker, is `tests/test_fleet_live.py::test_a_lazy_worker_loads_on_first_request...`).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from gpu_workers.engine import EngineConfig
from gpu_workers.engine_pool import LOAD_RETRY_S, EnginePool, NoRoom, SpecLoadFailed

GIB = 2**30


class Loader:
    """Records loads and unloads; `fail` names specs whose load raises; `delay_s` slows every load."""

    def __init__(self, *, fail: tuple[str, ...] = (), delay_s: float = 0.0) -> None:
        self.calls: list[str] = []
        self.fail = set(fail)
        self.delay_s = delay_s
        self.lock = threading.Lock()

    def load(self, config: EngineConfig) -> object:
        with self.lock:
            self.calls.append(f"load {config.spec_name}")
        time.sleep(self.delay_s)
        if config.spec_name in self.fail:
            raise ValueError("max_model_len too large")
        return object()

    def unload(self, name: str, engine: object) -> None:
        with self.lock:
            self.calls.append(f"unload {name}")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pool(loader: Loader, *, budget_gib: float, specs: dict[str, float], clock: Clock | None = None) -> EnginePool:
    return EnginePool(
        configs={name: EngineConfig(spec_name=name, model_path=Path("/models") / name) for name in specs},
        need_bytes={name: int(gib * GIB) for name, gib in specs.items()},
        budget_bytes=int(budget_gib * GIB),
        load=loader.load,
        unload=loader.unload,
        clock=clock or time.monotonic,
    )


def use(engines: EnginePool, spec: str, clock: Clock | None = None) -> None:
    with engines.acquire(spec, wait_s=0):
        if clock is not None:
            clock.now += 1


def test_nothing_is_loaded_before_the_first_request() -> None:
    loader = Loader()
    engines = pool(loader, budget_gib=4, specs={"a": 1, "b": 1})
    assert (engines.loaded(), engines.lazy(), loader.calls) == ([], ["a", "b"], [])
    use(engines, "a")
    use(engines, "a")
    assert (engines.loaded(), engines.lazy(), loader.calls) == (["a"], ["b"], ["load a"])
    assert engines.describe() == {"budget_bytes": 4 * GIB, "used_bytes": GIB}


@pytest.mark.parametrize(
    ("order", "then", "unloaded"),
    [
        pytest.param("abc", "d", ["a"], id="the-least-recently-used-goes"),
        pytest.param("abca", "d", ["b"], id="a-use-refreshes-a-spec"),
        pytest.param("abc", "c", [], id="a-loaded-spec-unloads-nothing"),
    ],
)
def test_least_recently_used_idle_spec_is_unloaded(order: str, then: str, unloaded: list[str]) -> None:
    loader, clock = Loader(), Clock()
    engines = pool(loader, budget_gib=3, specs=dict.fromkeys("abcd", 1), clock=clock)
    for spec in order:
        use(engines, spec, clock)
    loader.calls.clear()
    use(engines, then, clock)
    assert [call.split()[1] for call in loader.calls if call.startswith("unload")] == unloaded


def test_as_many_as_needed_are_unloaded_for_a_big_spec() -> None:
    loader, clock = Loader(), Clock()
    engines = pool(loader, budget_gib=3, specs={"a": 1, "b": 1, "c": 1, "big": 2.5}, clock=clock)
    for spec in "abc":
        use(engines, spec, clock)
    loader.calls.clear()
    use(engines, "big", clock)
    assert loader.calls == ["unload a", "unload b", "unload c", "load big"]
    assert engines.loaded() == ["big"]


def test_a_busy_spec_is_never_unloaded_and_the_load_waits_for_it() -> None:
    loader = Loader()
    engines = pool(loader, budget_gib=1, specs={"a": 1, "b": 1})
    with engines.acquire("a", wait_s=0), pytest.raises(NoRoom, match="busy specs \\['a'\\]"):
        engines.acquire("b", wait_s=0.2).__enter__()
    assert loader.calls == ["load a"]

    release = threading.Event()

    def hold_a() -> None:
        with engines.acquire("a", wait_s=0):
            release.wait(5)

    holder = threading.Thread(target=hold_a)
    holder.start()
    threading.Timer(0.3, release.set).start()
    started = time.monotonic()
    use_b = engines.acquire("b", wait_s=5)
    with use_b:  # loaded as soon as `a` went idle
        assert time.monotonic() - started >= 0.25
    holder.join()
    assert loader.calls == ["load a", "unload a", "load b"]


def test_concurrent_first_requests_share_one_load_however_long_it_takes() -> None:
    loader = Loader(delay_s=0.5)
    engines = pool(loader, budget_gib=2, specs={"a": 1})
    got: list[object] = []

    def request() -> None:
        with engines.acquire("a", wait_s=0.1) as engine:  # the room wait does not bound waiting for a load
            got.append(engine)

    threads = [threading.Thread(target=request) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loader.calls == ["load a"]
    assert len(got) == 8 and len({id(engine) for engine in got}) == 1


def test_a_failed_load_is_refused_for_a_while_then_tried_again() -> None:
    loader, clock = Loader(fail=("bad",)), Clock()
    engines = pool(loader, budget_gib=2, specs={"good": 1, "bad": 1}, clock=clock)
    use(engines, "good", clock)
    for _ in range(3):
        with pytest.raises(SpecLoadFailed, match="bad failed to load: ValueError: max_model_len too large"):
            use(engines, "bad", clock)
    assert loader.calls == ["load good", "load bad"]  # loaded once, refused from memory after
    assert engines.loaded() == ["good"] and engines.used_bytes() == GIB  # nothing was unloaded for it
    clock.now += LOAD_RETRY_S
    with pytest.raises(SpecLoadFailed):
        use(engines, "bad", clock)
    assert loader.calls == ["load good", "load bad", "load bad"]
