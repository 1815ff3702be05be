"""Plain SQL on the ORM's tables, for the hot writes where building model instances costs more than the write."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.db import models


def rows_query(
    cursor: Any, model: type[models.Model], fields: Sequence[str], rows: Sequence[Sequence[Any]]
) -> tuple[str, list[Any]]:
    """`rows` (database-ready values of `fields`, in that order, at least one) as a query with one column per field,
    and its parameters: for `INSERT ... <query>` or `WITH v (...) AS (<query>)`.

    On PostgreSQL it is `SELECT * FROM unnest(CAST(%s AS type[]), ...)`: one array parameter per column, so the
    statement's text is the same for any number of rows and psycopg converts it once (it caches statements of at
    most 50 parameters; a multi-row VALUES of 20 jobs has 180, and parsing it anew each time was a quarter of the
    control worker's CPU per run of job events). Elsewhere it is `VALUES (...), (...)`."""
    if cursor.db.vendor == "postgresql":
        casts = [f"CAST(%s AS {model._meta.get_field(name).db_type(cursor.db)}[])" for name in fields]
        return f"SELECT * FROM unnest({', '.join(casts)})", [list(column) for column in zip(*rows, strict=True)]
    placeholders = f"({', '.join(['%s'] * len(fields))})"
    return f"VALUES {', '.join([placeholders] * len(rows))}", [value for row in rows for value in row]


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
