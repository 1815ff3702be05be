"""`api.disconnects`: a client's `http.disconnect` runs what the request registered, at once and only once, and never
after the response is complete."""

from __future__ import annotations

import asyncio
from typing import Any

from api.disconnects import DisconnectWatch, on_client_disconnect


def run_app(view, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs `view(receive, send)` under DisconnectWatch with a client sending `messages`; returns what was sent."""
    sent: list[dict[str, Any]] = []
    incoming = list(messages)

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(0)
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def app(scope, receive, send) -> None:
        await view(receive, send)

    asyncio.run(DisconnectWatch(app)({"type": "http"}, receive, send))
    return sent


def test_a_disconnect_mid_response_runs_the_callback_once() -> None:
    calls: list[str] = []

    async def view(receive, send) -> None:
        on_client_disconnect(lambda: calls.append("left"))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        assert (await receive())["type"] == "http.disconnect"
        assert calls == ["left"]  # before the view even hears of it
        await receive()  # a second disconnect message does not call it again

    run_app(view, [{"type": "http.disconnect"}, {"type": "http.disconnect"}])
    assert calls == ["left"]


def test_no_callback_after_the_response_is_complete_or_unregistered() -> None:
    calls: list[str] = []

    async def complete(receive, send) -> None:
        on_client_disconnect(lambda: calls.append("complete"))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})
        await receive()

    async def unregistered(receive, send) -> None:
        on_client_disconnect(lambda: calls.append("unregistered"))()
        await receive()

    run_app(complete, [{"type": "http.disconnect"}])
    run_app(unregistered, [{"type": "http.disconnect"}])
    assert calls == []


def test_outside_the_watch_registering_is_a_no_op() -> None:
    unregister = on_client_disconnect(lambda: None)
    unregister()  # nothing to undo, nothing raised
