"""Plain SQL on the ORM's tables, for the hot writes where building model instances costs more than the write."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.db import models


def insert_rows(
    cursor: Any, model: type[models.Model], fields: Sequence[str], rows: Sequence[Sequence[Any]], *, per_statement: int
) -> None:
    """INSERTs `rows` (database-ready values of `fields`, in that order) as multi-row statements of at most
    `per_statement` rows: the database parses, plans and commits each statement once, not once per row."""
    quote = cursor.db.ops.quote_name
    columns = ", ".join(quote(model._meta.get_field(name).column) for name in fields)
    head = f"INSERT INTO {quote(model._meta.db_table)} ({columns}) VALUES "
    placeholders = f"({', '.join(['%s'] * len(fields))})"
    for start in range(0, len(rows), per_statement):
        chunk = rows[start : start + per_statement]
        cursor.execute(head + ", ".join([placeholders] * len(chunk)), [value for row in chunk for value in row])
