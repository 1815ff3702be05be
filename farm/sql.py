"""Plain SQL on the ORM's tables, for the hot writes where building model instances costs more than the write."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from django.db import connections, models

# Up to this many parameters a PostgreSQL row source is a VALUES list; past it, one array per column (`rows_query`).
# psycopg parses a statement's text once and caches it while it has at most this many parameters
# (`psycopg._queries.MAX_CACHED_STATEMENT_PARAMS`); a longer VALUES list is parsed again at every execution.
VALUES_MAX_PARAMS = 50


def rows_query(
    cursor: Any, model: type[models.Model], fields: Sequence[str], rows: Sequence[Sequence[Any]]
) -> tuple[str, list[Any]]:
    """`rows` (database-ready values of `fields`, in that order, at least one) as a query with one column per field,
    and its parameters: for `INSERT ... <query>` or `WITH v (...) AS (<query>)`.

    On PostgreSQL a single row, or rows of up to `VALUES_MAX_PARAMS` values in all, are `VALUES (...), (...)` with
    the first row cast to the columns' types (a VALUES column is typed by its rows, where a NULL or a string is text).
    Past that it is `SELECT * FROM unnest(CAST(%s AS type[]), ...)`: one array per column, so the text stops growing
    with the rows and psycopg parses it once. Runs of 20 jobs' events: 0.37-0.43 -> 0.22-0.26 ms of the control
    worker's CPU per job; arrays cost more than a few rows of values, hence the threshold. The API's new jobs (20
    columns) in groups of 3-8 were VALUES lists of 60-160 parameters that psycopg parsed at every INSERT: ~3 % of
    the API's CPU at c=16 (py-spy, BENCHMARKS.md 2026-12-07 late morning). Elsewhere it is `VALUES (...), (...)`."""
    placeholders = f"({', '.join(['%s'] * len(fields))})"
    flat = [value for row in rows for value in row]
    if cursor.db.vendor != "postgresql":
        return f"VALUES {', '.join([placeholders] * len(rows))}", flat
    types = _column_types(cursor.db.alias, model, tuple(fields))
    if len(rows) == 1 or len(flat) <= VALUES_MAX_PARAMS:
        first = f"({', '.join(f'CAST(%s AS {column_type})' for column_type in types)})"
        return f"VALUES {', '.join([first] + [placeholders] * (len(rows) - 1))}", flat
    casts = ", ".join(f"CAST(%s AS {column_type}[])" for column_type in types)
    return f"SELECT * FROM unnest({casts})", [list(column) for column in zip(*rows, strict=True)]


@functools.cache
def _column_types(alias: str, model: type[models.Model], fields: tuple[str, ...]) -> tuple[str, ...]:
    """The database types of `fields` (a foreign key's `db_type` builds a field on each call: ~3 % of the API)."""
    return tuple(model._meta.get_field(name).db_type(connections[alias]) for name in fields)


def insert_rows(
    cursor: Any, model: type[models.Model], fields: Sequence[str], rows: Sequence[Sequence[Any]], *, per_statement: int
) -> None:
    """INSERTs `rows` (database-ready values of `fields`, in that order) in statements of at most `per_statement`
    rows (`rows_query`): the database parses, plans and commits each statement once, not once per row."""
    quote = cursor.db.ops.quote_name
    columns = ", ".join(quote(model._meta.get_field(name).column) for name in fields)
    head = f"INSERT INTO {quote(model._meta.db_table)} ({columns}) "
    for start in range(0, len(rows), per_statement):
        query, params = rows_query(cursor, model, fields, rows[start : start + per_statement])
        cursor.execute(head + query, params)
