"""`RequestIdASGI` driven with raw ASGI messages: the id is settled before anything answers, so even the body-size
guard's 413 (which never reaches Django) carries it, and the inner app sees the same id."""

from __future__ import annotations

import asyncio
from typing import Any

from api.asgi import BodySizeLimit
from api.middleware import RequestIdASGI


def drive(app: Any, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers}
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def response_id(sent: list[dict[str, Any]]) -> list[bytes]:
    start = next(m for m in sent if m["type"] == "http.response.start")
    return [v for k, v in start["headers"] if k == b"x-request-id"]


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers with the request id it was given, in the body (as Django's middleware would read it)."""
    seen = [v for k, v in scope["headers"] if k == b"x-request-id"]
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"|".join(seen)})


def test_the_413_of_the_body_guard_carries_the_request_id() -> None:
    app = RequestIdASGI(BodySizeLimit(echo, 10))
    sent = drive(app, [(b"x-request-id", b"big-1"), (b"content-length", b"11")], b"x" * 11)
    assert sent[0]["status"] == 413 and response_id(sent) == [b"big-1"]
    generated = response_id(drive(app, [(b"content-length", b"11")], b"x" * 11))
    assert len(generated) == 1 and generated[0].startswith(b"req_")


def test_the_inner_app_sees_the_settled_id_once_and_the_response_carries_it_once() -> None:
    app = RequestIdASGI(echo)
    sent = drive(app, [(b"x-request-id", b"ok-1")], b"{}")
    assert sent[1]["body"] == b"ok-1" and response_id(sent) == [b"ok-1"]
    invalid = drive(app, [(b"x-request-id", b"bad id")], b"{}")
    assert invalid[1]["body"].startswith(b"req_") and response_id(invalid) == [invalid[1]["body"]]
