"""One read at a time per key (`farm.single_flight`), and the per-process caches that use it: the model catalogue,
API keys, spec back-offs and queue depths. A cache entry that expires under load is read once, not once per request
that finds it expired."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from farm import api_keys, catalog, queues, spec_health
from farm.api_keys import api_key_authenticate, api_key_create, api_key_revoke
from farm.db import close_pool_connections
from farm.redis_client import sync_redis
from farm.single_flight import SingleFlight
from tests.conftest import TINY_MODEL


def counted(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[int]:
    """Counts the calls of `owner.name`, which still runs (the real database or Redis read)."""
    calls: list[int] = []
    real: Callable[..., Any] = getattr(owner, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls


def test_callers_of_one_key_share_one_read_and_other_keys_read_on_their_own() -> None:
    async def scenario() -> None:
        flights = SingleFlight()
        reads: list[str] = []
        release = asyncio.Event()

        async def read(key: str) -> str:
            reads.append(key)
            await release.wait()
            return f"value of {key}"

        waiting = [asyncio.create_task(flights.run("a", lambda: read("a"))) for _ in range(50)]
        other = asyncio.create_task(flights.run("b", lambda: read("b")))
        await asyncio.sleep(0.01)
        release.set()
        assert await asyncio.gather(*waiting) == ["value of a"] * 50
        assert await other == "value of b"
        assert sorted(reads) == ["a", "b"]
        assert await flights.run("a", lambda: read("a")) == "value of a"  # a landed read is not served again
        assert reads.count("a") == 2

    asyncio.run(scenario())


def test_a_caller_that_leaves_does_not_cancel_the_read_the_others_wait_for() -> None:
    async def scenario() -> None:
        flights = SingleFlight()
        release = asyncio.Event()

        async def read() -> int:
            await release.wait()
            return 7

        leaving = asyncio.create_task(flights.run("k", read))
        staying = asyncio.create_task(flights.run("k", read))
        await asyncio.sleep(0.01)
        leaving.cancel()
        await asyncio.sleep(0.01)
        release.set()
        assert await staying == 7
        assert leaving.cancelled()

    asyncio.run(scenario())


def test_a_failed_read_reaches_every_caller_and_the_next_caller_reads_again() -> None:
    async def scenario() -> None:
        flights = SingleFlight()
        attempts: list[int] = []

        async def read() -> int:
            attempts.append(1)
            await asyncio.sleep(0.01)
            if len(attempts) == 1:
                raise ConnectionError("database gone")
            return 1

        results = await asyncio.gather(*(flights.run("k", read) for _ in range(5)), return_exceptions=True)
        assert all(isinstance(result, ConnectionError) for result in results)
        assert await flights.run("k", read) == 1
        assert len(attempts) == 2

    asyncio.run(scenario())


def test_after_forget_a_caller_starts_a_new_read_and_the_earlier_read_is_not_stored() -> None:
    async def scenario() -> None:
        flights = SingleFlight()
        state = {"value": "before"}
        release = asyncio.Event()

        async def read() -> str:
            seen = state["value"]
            await release.wait()
            return seen

        stored: list[str] = []
        early = asyncio.create_task(flights.run("k", read, store=stored.append))
        await asyncio.sleep(0.01)
        state["value"] = "after"
        flights.forget()
        late = asyncio.create_task(flights.run("k", read, store=stored.append))
        await asyncio.sleep(0.01)
        release.set()
        assert (await early, await late) == ("before", "after")
        assert stored == ["after"]  # the read begun before `forget` is not stored

    asyncio.run(scenario())


def test_an_expired_catalogue_is_loaded_once_for_all_the_requests_that_find_it_expired(
    farm_catalog, django_db_blocker, monkeypatch
) -> None:
    loads = counted(monkeypatch, catalog, "_load_models")
    catalog.catalog_invalidate()

    async def burst() -> list[dict]:
        return await asyncio.gather(*(catalog.model_catalog() for _ in range(50)))

    with django_db_blocker.unblock():
        try:
            results = asyncio.run(burst())
        finally:
            close_pool_connections()
    assert len(loads) == 1
    assert all(result is results[0] for result in results)
    assert TINY_MODEL in results[0]


def test_a_catalogue_load_begun_before_an_invalidation_does_not_become_the_cache(
    farm_catalog, django_db_blocker, monkeypatch
) -> None:
    """A model changed in this process invalidates the cache: a load already in flight may predate the change, so
    the next request loads again and the earlier load's result is not kept."""
    entered = threading.Event()
    release = threading.Event()
    real = catalog._load_models
    results: list[dict] = []

    def held_load() -> dict:
        entries = real()
        results.append(entries)
        if len(results) == 1:
            entered.set()
            assert release.wait(10)
        return entries

    monkeypatch.setattr(catalog, "_load_models", held_load)
    catalog.catalog_invalidate()

    async def scenario() -> tuple[dict, dict]:
        early = asyncio.create_task(catalog.model_catalog())
        assert await asyncio.to_thread(entered.wait, 10)
        catalog.catalog_invalidate()
        late = await catalog.model_catalog()  # does not wait for the held load
        release.set()
        return await early, late

    with django_db_blocker.unblock():
        try:
            early, late = asyncio.run(scenario())
        finally:
            release.set()
            close_pool_connections()
    assert len(results) == 2
    assert early is results[0] and late is results[1]
    assert catalog._models[1] is results[1]


def test_an_expired_key_is_looked_up_once_for_all_its_waiting_requests(committed_user, monkeypatch) -> None:
    lookups = counted(monkeypatch, api_keys, "api_key_authenticate_sync")
    key, raw = api_key_create(owner=committed_user, name="herd")

    async def burst() -> list:
        return await asyncio.gather(*(api_key_authenticate(raw) for _ in range(50)))

    principals = asyncio.run(burst())
    assert len(lookups) == 1
    assert {principal.key_id for principal in principals} == {key.pk}
    api_key_revoke(key=key)  # clears this process' cache: the next request looks the key up again
    assert asyncio.run(api_key_authenticate(raw)) is None
    assert len(lookups) == 2


def test_expired_back_offs_and_queue_depths_are_read_once_per_burst(monkeypatch) -> None:
    spec = "single-flight-spec"
    client = sync_redis()
    client.delete(queues.infer_queue(spec))
    client.rpush(queues.infer_queue(spec), b"m1", b"m2", b"m3")
    spec_health.backoffs_invalidate()
    commands: list[str] = []
    from redis.asyncio.client import Pipeline, Redis

    real_hgetall, real_execute = Redis.hgetall, Pipeline.execute

    async def hgetall(self, *args: Any, **kwargs: Any) -> Any:
        commands.append("HGETALL")
        return await real_hgetall(self, *args, **kwargs)

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        commands.append("pipeline")
        return await real_execute(self, *args, **kwargs)

    monkeypatch.setattr(Redis, "hgetall", hgetall)
    monkeypatch.setattr(Pipeline, "execute", execute)

    async def burst() -> tuple[list, list]:
        backoffs = asyncio.gather(*(spec_health.spec_backoffs() for _ in range(30)))
        depths = asyncio.gather(*(spec_health.queue_depths([spec]) for _ in range(30)))
        return await backoffs, await depths

    try:
        backoffs, depths = asyncio.run(burst())
    finally:
        client.delete(queues.infer_queue(spec))
        spec_health.backoffs_invalidate()
    assert sorted(commands) == ["HGETALL", "pipeline"]
    assert all(isinstance(value, dict) for value in backoffs)
    assert depths == [{spec: 3}] * 30
