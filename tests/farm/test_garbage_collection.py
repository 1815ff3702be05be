"""`farm.garbage_collection`: what a process loaded before it serves is kept out of full collections, and still
freed when something long-lived is let go inside `thawed()`; the API (ASGI lifespan) and every Celery worker
(`worker_ready`) freeze at start-up."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from farm.garbage_collection import freeze_startup, thawed


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # the test process' own objects go back to the collector


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def test_freeze_moves_what_is_alive_out_of_full_collections() -> None:
    node = Node()
    assert gc.get_freeze_count() == 0
    frozen = freeze_startup("test")
    # Threads left by earlier tests (idle publishers, executor threads) may free frozen objects meanwhile: the count
    # can only fall, and only by a few.
    assert frozen >= gc.get_freeze_count() > max(1000, frozen - 1000)
    gone = weakref.ref(node)
    del node
    gc.collect()
    assert gone() is not None  # frozen: the full collection did not walk it


def test_thawed_frees_frozen_cycles_then_freezes_again() -> None:
    node = Node()
    freeze_startup("test")
    gone = weakref.ref(node)
    with thawed():
        assert gc.get_freeze_count() == 0
        del node
    assert gone() is None
    assert gc.get_freeze_count() > 1000


def test_api_lifespan_startup_freezes() -> None:
    from api.asgi import application

    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(application({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert gc.get_freeze_count() > 1000


def test_celery_workers_freeze_once_ready() -> None:
    from celery.signals import worker_ready

    from farm.celery_app import create_celery_app

    create_celery_app(broker_url="memory://")
    worker_ready.send(sender=None)
    assert gc.get_freeze_count() > 1000


def test_engine_host_freezes_after_a_load_and_frees_an_unloaded_engines_cycles(monkeypatch, tmp_path) -> None:
    """A spec loaded on demand is frozen with the rest; unloading it must still free its cycles (a vLLM engine's
    objects hold each other), so the unload runs thawed."""
    from gpu_workers import envs
    from gpu_workers.engine import EngineConfig
    from gpu_workers.engine_host import EngineHost
    from settings import env

    monkeypatch.setattr(envs, "FARM_NULL_ENGINE", True)  # the real host, the zero-cost engine
    host = EngineHost(redis_url=env.REDIS_URL)
    try:
        engine = host.load(EngineConfig(spec_name="gc-test", model_path=tmp_path))
        assert gc.get_freeze_count() > 1000
        engine.me = engine  # type: ignore[attr-defined]  (a cycle, as a real engine's objects make)
        gone = weakref.ref(engine)
        del engine
        host.unload("gc-test")
        assert gone() is None
        assert gc.get_freeze_count() > 1000  # frozen again after the unload
    finally:
        host.close()
