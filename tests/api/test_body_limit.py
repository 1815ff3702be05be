"""`BodySizeLimit` (api/asgi.py) driven with raw ASGI messages: small bodies replayed intact, big ones a 413."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from api.asgi import BodySizeLimit, Message, Receive, Scope, Send

LIMIT = 1000


@dataclass
class RecordingApp:
    """The inner app: reads the whole body the way Django does, then one more receive (disconnect watch)."""

    calls: int = 0
    received: list[Message] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        while True:
            message = await receive()
            self.received.append(message)
            if not message.get("more_body", False):
                break
        self.received.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.received if m["type"] == "http.request")


def run(
    chunks: list[bytes], *, declared: int | None = None, method: str = "POST"
) -> tuple[RecordingApp, list[Message]]:
    headers = [(b"content-type", b"application/json")]
    if declared is not None:
        headers.append((b"content-length", str(declared).encode()))
    scope = {"type": "http", "method": method, "path": "/v1/chat/completions", "headers": headers}
    incoming = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1} for i, chunk in enumerate(chunks)
    ] + [{"type": "http.disconnect"}]
    sent: list[Message] = []

    async def receive() -> Message:
        assert incoming, "read past the disconnect"
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    inner = RecordingApp()
    asyncio.run(BodySizeLimit(inner, LIMIT)(scope, receive, send))
    return inner, sent


def assert_413(inner: RecordingApp, sent: list[Message]) -> None:
    assert inner.calls == 0
    start, body = sent
    assert start["status"] == 413
    headers = dict(start["headers"])
    assert headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(body["body"])
    error: dict[str, Any] = orjson.loads(body["body"])["error"]
    assert error["code"] == "request_too_large"
    assert error["type"] == "invalid_request_error"
    assert str(LIMIT) in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("chunks", "declared"),
    [
        pytest.param([b'{"a": 1}'], 8, id="one-chunk"),
        pytest.param([b"x" * 300, b"y" * 300, b"", b"z" * 400], None, id="chunked-exactly-at-limit"),
        pytest.param([b"x" * LIMIT], LIMIT, id="declared-exactly-at-limit"),
        pytest.param([b""], 0, id="empty"),
    ],
)
def test_body_under_the_limit_is_replayed_intact_in_one_message(chunks: list[bytes], declared: int | None) -> None:
    inner, sent = run(chunks, declared=declared)
    assert inner.calls == 1
    assert inner.received[0] == {"type": "http.request", "body": b"".join(chunks), "more_body": False}
    assert inner.received[1] == {"type": "http.disconnect"}  # later receives reach the server again
    assert sent[0]["status"] == 200


def test_declared_length_over_the_limit_is_rejected_before_reading() -> None:
    inner, sent = run([b"x" * 10], declared=LIMIT + 1)
    assert_413(inner, sent)


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param([b"x" * (LIMIT + 1)], id="one-chunk"),
        pytest.param([b"x" * 400] * 3, id="many-chunks"),
        pytest.param([b"x" * LIMIT, b"y"], id="one-byte-over"),
    ],
)
def test_chunked_body_over_the_limit_is_rejected(chunks: list[bytes]) -> None:
    assert_413(*run(chunks))


def test_understated_content_length_does_not_bypass_the_limit() -> None:
    assert_413(*run([b"x" * 600, b"x" * 600], declared=10))


def test_client_gone_mid_body_calls_nothing_and_sends_nothing() -> None:
    inner, sent = run([])
    assert (inner.calls, sent) == (0, [])


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
def test_bodyless_methods_pass_through_untouched(method: str) -> None:
    inner, _ = run([b"x" * (LIMIT + 1)], declared=LIMIT + 1, method=method)
    assert inner.calls == 1
    assert inner.received[0]["body"] == b"x" * (LIMIT + 1)
