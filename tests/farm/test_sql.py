"""`farm.sql.rows_query`, the row source of the bulk writes: what goes in reads back, and it types its columns; as
a VALUES list and (past `VALUES_MAX_PARAMS`, on PostgreSQL) as arrays through unnest."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from django.db import connection

import farm.sql
from farm.models import Job
from farm.sql import rows_query

FIELDS = ("id", "attempt", "worker_id", "started_at", "usage")
AT = datetime(2026, 12, 3, 16, 0, tzinfo=UTC)


def source(rows: list[tuple[Any, ...]]) -> tuple[str, list[Any]]:
    fields = [Job._meta.get_field(name) for name in FIELDS]
    prepared = [[f.get_db_prep_save(v, connection) for f, v in zip(fields, row, strict=True)] for row in rows]
    query, params = rows_query(connection.cursor(), Job, FIELDS, prepared)
    return f"WITH v ({', '.join(FIELDS)}) AS ({query})", params


@pytest.fixture(params=["values", "arrays"])
def row_source(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "arrays":
        monkeypatch.setattr(farm.sql, "VALUES_MAX_PARAMS", 0)
    return request.param


@pytest.mark.django_db
def test_values_read_back_with_nulls_and_awkward_strings(row_source: str) -> None:
    rows = [
        (uuid.uuid4(), 1, "", None, None),
        (uuid.uuid4(), 2, 'it\'s \\ {a,b} "q" ☃', AT, {"prompt_tokens": 3, "note": "x'y"}),
        (uuid.uuid4(), 3, "w", None, None),
    ]
    head, params = source(rows)
    with connection.cursor() as cursor:
        cursor.execute(f"{head} SELECT id, attempt, worker_id, started_at, usage FROM v", params)
        read = cursor.fetchall()
    id_field, started_field, usage_field = (Job._meta.get_field(name) for name in ("id", "started_at", "usage"))
    assert [(id_field.to_python(r[0]), r[1], r[2]) for r in read] == [row[:3] for row in rows]
    assert [usage_field.from_db_value(r[4], None, connection) for r in read] == [row[4] for row in rows]
    started = [started_field.to_python(r[3]) for r in read]
    assert started[0] is None and started[2] is None
    assert started[1].replace(tzinfo=started[1].tzinfo or UTC) == AT  # SQLite reads it back naive (UTC)


@pytest.mark.django_db
def test_an_update_from_columns_of_only_nulls_and_strings_is_typed(row_source: str) -> None:
    """PostgreSQL types a VALUES column by its rows: with only NULLs (or untyped strings) it would be text, and
    assigning it to a timestamp or jsonb column fails at planning, matching rows or not, unless the rows are cast."""
    head, params = source([(uuid.uuid4(), 1, "w", None, None), (uuid.uuid4(), 1, "x", None, None)])
    table = connection.ops.quote_name(Job._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"{head} UPDATE {table} SET worker_id = v.worker_id, started_at = v.started_at, usage = v.usage "
            f"FROM v WHERE {table}.id = v.id AND {table}.attempt = v.attempt",
            params,
        )  # no job has these ids: what is tested is that the statement plans


@pytest.mark.django_db
def test_a_values_list_stays_within_what_psycopg_parses_once() -> None:
    """psycopg caches a statement's parse only up to MAX_CACHED_STATEMENT_PARAMS parameters; a longer VALUES list
    (the API's new jobs have 20 columns) was parsed again at every INSERT, so past that the rows go as arrays."""
    if connection.vendor != "postgresql":
        pytest.skip("arrays through unnest are PostgreSQL's")
    from psycopg._queries import MAX_CACHED_STATEMENT_PARAMS

    assert farm.sql.VALUES_MAX_PARAMS <= MAX_CACHED_STATEMENT_PARAMS
    rows = [(uuid.uuid4(), i, "w", None, None) for i in range(farm.sql.VALUES_MAX_PARAMS // len(FIELDS) + 1)]
    assert "(VALUES (" in source(rows[:-1])[0] and "unnest" not in source(rows[:-1])[0]
    assert "unnest" in source(rows)[0]
