"""Static files (admin, API docs UI) come from the app, and API requests never leave the event loop for them."""

from __future__ import annotations

import asyncio
import logging

import pytest
from django.test import AsyncClient


def test_the_middleware_chain_never_leaves_the_event_loop(caplog: pytest.LogCaptureFixture, settings) -> None:
    """Django adapts a sync-only middleware with two thread hops per request (WhiteNoise 6 is sync-only): none is."""
    from django.core.handlers.asgi import ASGIHandler

    settings.DEBUG = True  # Django logs each adaptation only then
    with caplog.at_level(logging.DEBUG, logger="django.request"):
        ASGIHandler()
    adapted = [record.getMessage() for record in caplog.records if "adapted for" in record.getMessage()]
    assert adapted == []


@pytest.mark.django_db
def test_admin_assets_are_served_and_unknown_ones_are_404() -> None:
    async def fetch(path: str) -> tuple[int, str, bytes]:
        response = await AsyncClient().get(path)
        if not response.streaming:
            body = response.content
        elif hasattr(response.streaming_content, "__aiter__"):
            body = b"".join([chunk async for chunk in response.streaming_content])
        else:  # a file response's sync iterator
            body = b"".join(response.streaming_content)
        return response.status_code, response.get("content-type", ""), body

    status, content_type, body = asyncio.run(fetch("/static/admin/css/base.css"))
    assert (status, content_type.split(";")[0]) == (200, "text/css")
    assert b"body" in body
    assert asyncio.run(fetch("/static/admin/css/no-such-file.css"))[0] == 404
