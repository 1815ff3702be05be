"""JSON responses serialised with orjson.

Django's `JsonResponse` runs the standard library's encoder through `DjangoJSONEncoder`: ~21 us for a chat
completion's body on the dev VM, against ~4.5 us here (BENCHMARKS.md, 2026-12-08). The bodies are the same JSON,
without the spaces after separators.
"""

from __future__ import annotations

from typing import Any

import orjson
from django.http import HttpResponse


class OrjsonResponse(HttpResponse):
    """`data` (dicts, lists, strings, numbers, None, UUIDs, datetimes) as an `application/json` response."""

    def __init__(self, data: Any, *, status: int = 200) -> None:
        super().__init__(orjson.dumps(data), status=status, content_type="application/json")
