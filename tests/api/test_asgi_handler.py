"""`api.asgi.FarmASGIHandler`: the generation endpoints run without a per-request `ThreadSensitiveContext` (no new
thread per request for Django's own bookkeeping), every other path with one, and both still answer through Django."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from asgiref.sync import ThreadSensitiveContext

import api.asgi
from api.asgi import FarmASGIHandler

pytestmark = pytest.mark.django_db(transaction=True)


def drive(path: str, method: str = "POST") -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(b"content-type", b"application/json"), (b"host", b"testserver")],
        "query_string": b"",
    }
    messages = [{"type": "http.request", "body": b"{}", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(FarmASGIHandler()(scope, receive, send))
    return sent


@pytest.fixture
def contexts(monkeypatch) -> list[str]:
    """Paths for which Django entered a ThreadSensitiveContext."""
    entered: list[str] = []

    class Counted(ThreadSensitiveContext):
        async def __aenter__(self) -> None:
            entered.append("entered")
            return await super().__aenter__()

    import django.core.handlers.asgi

    monkeypatch.setattr(django.core.handlers.asgi, "ThreadSensitiveContext", Counted)
    return entered


@pytest.mark.parametrize("path", sorted(api.asgi.SHARED_THREAD_PATHS))
def test_generation_endpoints_answer_without_a_per_request_thread_context(path: str, contexts: list[str]) -> None:
    sent = drive(path)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = orjson.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    assert start["status"] == 401 and body["error"]["type"] == "authentication_error"  # Django's view answered
    assert contexts == []


def test_other_paths_keep_djangos_per_request_thread_context(contexts: list[str]) -> None:
    sent = drive("/healthz", method="GET")
    assert next(m for m in sent if m["type"] == "http.response.start")["status"] == 200
    assert contexts == ["entered"]
