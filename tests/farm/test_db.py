"""`farm.db.run_db`: ORM work of async views on a pool of threads with persistent connections, which recover by
themselves after their connection broke (a database restart, a cut network)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest
from django.db import DatabaseError, connection

from farm.db import POOL_SIZE, close_pool_connections, run_db

pytestmark = pytest.mark.django_db(transaction=True)


def select_one() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        return cursor.fetchone()[0]


def on_every_thread(function: Callable[[], object], barrier: threading.Barrier) -> Callable[[], object]:
    """`function` for a batch of POOL_SIZE concurrent calls that each hold their pool thread until all have started:
    the batch runs once on every thread (the executor would otherwise hand a quick call to whichever thread is free,
    and a thread might sit out many calls in a row)."""

    def call() -> object:
        barrier.wait(timeout=10)
        return function()

    return call


def break_connection() -> None:
    connection.ensure_connection()
    connection.connection.close()  # the server side went away: Django's wrapper still holds the dead connection


def test_a_pool_thread_whose_connection_broke_reconnects_on_its_next_call() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL: SQLite is a file, there is no connection to lose")

    async def scenario() -> list[str]:
        outcomes = []
        broken = on_every_thread(break_connection, threading.Barrier(POOL_SIZE))
        await asyncio.gather(*(run_db(broken) for _ in range(POOL_SIZE)))  # every pool thread's connection
        for _ in range(3):
            select = on_every_thread(select_one, threading.Barrier(POOL_SIZE))
            for result in await asyncio.gather(*(run_db(select) for _ in range(POOL_SIZE)), return_exceptions=True):
                if isinstance(result, BaseException) and not isinstance(result, DatabaseError):
                    raise result
                outcomes.append("error" if isinstance(result, DatabaseError) else str(result))
        return outcomes

    try:
        outcomes = asyncio.run(scenario())
    finally:
        close_pool_connections()
    # Each broken thread fails at most once, then serves again.
    assert outcomes.count("error") <= POOL_SIZE
    assert outcomes[-POOL_SIZE:] == ["1"] * POOL_SIZE


def test_a_sqlite_connection_outlives_the_check_before_each_control_task(tmp_path) -> None:
    """The embedded default keeps its connections like PostgreSQL does: the control worker's check before each task
    (`close_old_connections`) reuses the SQLite connection instead of opening a new one (and running its PRAGMAs)."""
    from django.db.utils import ConnectionHandler

    from settings.django import database_settings

    handler = ConnectionHandler({"default": database_settings(f"sqlite:///{tmp_path / 'farm.sqlite3'}")})
    sqlite = handler["default"]
    try:
        with sqlite.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode")
            assert cursor.fetchone()[0] == "wal"
        opened = sqlite.connection
        sqlite.close_if_unusable_or_obsolete()  # what `close_old_connections` does to each connection
        with sqlite.cursor() as cursor:
            cursor.execute("SELECT 1")
        assert sqlite.connection is opened
    finally:
        sqlite.close()
