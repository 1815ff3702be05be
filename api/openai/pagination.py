"""OpenAI's cursor lists (`{"object": "list", "data", "has_more", "first_id", "last_id"}`), shared by every family."""

from __future__ import annotations

from typing import Any

from rest_framework.request import Request

# Longest id any farm object has (`batch_<32 hex>`); a longer `after` cannot name one.
MAX_ID_CHARS = 40


def list_page(data: list[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    """One page of objects in OpenAI's list envelope."""
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def list_params(request: Request) -> dict[str, str]:
    """Query parameters of a list: empty ones mean their default; an `after` that cannot be an id (NUL, too long)
    matches nothing, so it is ignored, as an unknown id is."""
    params = {key: value for key, value in request.query_params.items() if value != ""}
    after = params.get("after", "")
    if "\x00" in after or len(after) > MAX_ID_CHARS:
        params.pop("after")
    return params
