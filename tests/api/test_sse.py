"""`api.sse`: an SSE stream ends with the chunk that carries `data: [DONE]`, not with an empty message after it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from api.asgi import FarmASGIHandler
from api.sse import DONE, SseResponse


def sent_by(handler_send: Any, chunks: list[bytes]) -> tuple[list[dict[str, Any]], list[str]]:
    """The ASGI messages sent for a stream of `chunks`, and what happened to its generator."""
    events: list[str] = []

    async def content() -> AsyncIterator[bytes]:
        try:
            for chunk in chunks:
                yield chunk
            events.append("exhausted")
        finally:
            events.append("closed")

    messages: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    asyncio.run(handler_send(SseResponse(content()), send))
    return messages, events


def test_the_chunk_with_done_ends_the_response() -> None:
    first, last = b'data: {"a": 1}\n\n', b'data: {"b": 2}\n\n' + DONE
    messages, events = sent_by(FarmASGIHandler().send_response, [first, last])
    start, *bodies = messages
    headers = dict(start["headers"])
    assert start["type"] == "http.response.start" and start["status"] == 200
    assert headers[b"Content-Type"] == b"text/event-stream" and headers[b"Cache-Control"] == b"no-cache"
    assert bodies == [
        {"type": "http.response.body", "body": first, "more_body": True},
        {"type": "http.response.body", "body": last, "more_body": False},
    ]
    # Run to its end, not closed at DONE: closing raises GeneratorExit at the last yield, which the chat view's
    # stream takes for the client leaving (it cancelled every finished job: seen in the bench, 2026-12-08).
    assert events == ["exhausted", "closed"]


def test_djangos_own_send_needs_one_message_more() -> None:
    """The contrast: Django's handler sends the same stream with an empty closing message after the last chunk."""
    from django.core.handlers.asgi import ASGIHandler

    messages, _ = sent_by(ASGIHandler().send_response, [b"data: x\n\n", DONE])
    assert [m.get("more_body", False) for m in messages[1:]] == [True, True, False]
    assert messages[-1] == {"type": "http.response.body"}


def test_a_stream_cut_short_still_ends() -> None:
    messages, events = sent_by(FarmASGIHandler().send_response, [b"data: x\n\n"])
    assert messages[1:] == [
        {"type": "http.response.body", "body": b"data: x\n\n", "more_body": True},
        {"type": "http.response.body"},
    ]
    assert events == ["exhausted", "closed"]
