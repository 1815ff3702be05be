"""`farm.db.run_db`: ORM work of async views on a pool of threads with persistent connections, which recover by
themselves after their connection broke (a database restart, a cut network)."""

from __future__ import annotations

import asyncio

import pytest
from django.db import DatabaseError, connection

from farm.db import POOL_SIZE, close_pool_connections, run_db

pytestmark = pytest.mark.django_db(transaction=True)


def select_one() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        return cursor.fetchone()[0]


def break_connection() -> None:
    connection.ensure_connection()
    connection.connection.close()  # the server side went away: Django's wrapper still holds the dead connection


def test_a_pool_thread_whose_connection_broke_reconnects_on_its_next_call() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL: SQLite is a file, there is no connection to lose")

    async def scenario() -> list[str]:
        outcomes = []
        for _ in range(POOL_SIZE):  # every pool thread's connection
            await asyncio.gather(*(run_db(break_connection) for _ in range(POOL_SIZE)))
        for _ in range(3 * POOL_SIZE):
            try:
                outcomes.append(str(await run_db(select_one)))
            except DatabaseError:
                outcomes.append("error")
        return outcomes

    try:
        outcomes = asyncio.run(scenario())
    finally:
        close_pool_connections()
    # Each broken thread fails at most once, then serves again.
    assert outcomes.count("error") <= POOL_SIZE
    assert outcomes[-POOL_SIZE:] == ["1"] * POOL_SIZE
