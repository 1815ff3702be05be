"""`api.asgi.FarmASGIHandler`: the generation endpoints run on the event loop without a single thread hop (no
`ThreadSensitiveContext`, no `sync_to_async` for Django's own bookkeeping), every other path as Django runs it, and
both answer through Django's middleware and views: same headers, same error log lines."""

from __future__ import annotations

import asyncio
import gc
from collections import Counter
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


@pytest.mark.parametrize("path", sorted(api.asgi.ON_THE_LOOP_PATHS))
def test_generation_endpoints_answer_without_a_per_request_thread_context(path: str, contexts: list[str]) -> None:
    sent = drive(path)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = orjson.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    assert start["status"] == 401 and body["error"]["type"] == "authentication_error"  # Django's view answered
    assert contexts == []


@pytest.fixture
def thread_hops(monkeypatch) -> list[str]:
    """What went through `sync_to_async` (a worker thread) while a request was handled."""
    from asgiref.sync import SyncToAsync

    hops: list[str] = []
    original = SyncToAsync.__call__

    async def counted(self: SyncToAsync, *args: Any, **kwargs: Any) -> Any:
        hops.append(getattr(self.func, "__qualname__", repr(self.func)))
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(SyncToAsync, "__call__", counted)
    return hops


@pytest.mark.parametrize("path", sorted(api.asgi.ON_THE_LOOP_PATHS))
def test_generation_endpoints_make_no_thread_hop_and_keep_djangos_headers_and_logs(
    path: str, thread_hops: list[str], caplog
) -> None:
    with caplog.at_level("WARNING", logger="django.request"):
        sent = drive(path)
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    assert start["status"] == 401
    assert thread_hops == []
    # What the middleware chain adds on Django's own path (security, clickjacking): the chain still ran.
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    assert any(record.getMessage() == f"Unauthorized: {path}" for record in caplog.records)


def test_djangos_own_path_makes_thread_hops(thread_hops: list[str]) -> None:
    """The contrast that makes the test above able to fail: Django's `handle` sends its signals through a thread."""
    drive("/healthz", method="GET")
    assert thread_hops


def test_other_paths_keep_djangos_per_request_thread_context(contexts: list[str]) -> None:
    sent = drive("/healthz", method="GET")
    assert next(m for m in sent if m["type"] == "http.response.start")["status"] == 200
    assert contexts == ["entered"]


@pytest.fixture
def request_signals() -> list[str]:
    """Django's request signals as they are sent."""
    from django.core import signals

    sent: list[str] = []

    def started(**kwargs: Any) -> None:
        sent.append("started")

    def finished(**kwargs: Any) -> None:
        sent.append("finished")

    signals.request_started.connect(started)
    signals.request_finished.connect(finished)
    yield sent
    signals.request_started.disconnect(started)
    signals.request_finished.disconnect(finished)


@pytest.mark.parametrize("path", sorted(api.asgi.ON_THE_LOOP_PATHS))
def test_generation_endpoints_skip_the_request_signals_but_close_the_request(
    path: str, request_signals: list[str], monkeypatch
) -> None:
    """Their receivers act on the calling thread's database connections, and the event loop's thread has none
    (Django refuses a query from async code): sent, they cost ~60 us per request for nothing (BENCHMARKS.md,
    2026-12-08). The response's closers still run: the request (and any file it spooled) is closed."""
    from django.core.handlers.asgi import ASGIRequest

    closed: list[str] = []
    original = ASGIRequest.close
    monkeypatch.setattr(ASGIRequest, "close", lambda self: (closed.append(self.path), original(self))[1])
    sent = drive(path)
    assert next(m for m in sent if m["type"] == "http.response.start")["status"] == 401
    assert request_signals == []
    assert closed == [path]


def test_djangos_own_path_sends_the_request_signals(request_signals: list[str]) -> None:
    """The contrast that makes the test above able to fail."""
    drive("/healthz", method="GET")
    assert request_signals == ["started", "finished"]


def test_generation_requests_leave_no_reference_cycles(settings) -> None:
    """uvicorn answers `receive()` with `http.disconnect` once the response is complete. Django's disconnect
    listener raised `RequestAborted` there, and the exception's traceback tied the handler's frame, request, response
    and tasks into a cycle: ~72 objects per request left to the garbage collector, whose full collections then
    stopped the API's event loop (BENCHMARKS.md, 2026-12-03). Now a request frees everything by reference count."""
    settings.WHITENOISE_AUTOREFRESH = False  # as served (DEBUG=0): development mode builds a file index per request
    handler = FarmASGIHandler()

    async def one_request() -> int:
        answered = asyncio.Event()
        messages = [{"type": "http.request", "body": b"{}", "more_body": False}]
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/chat/completions",
            "headers": [(b"content-type", b"application/json"), (b"host", b"testserver")],
            "query_string": b"",
        }

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await answered.wait()  # as uvicorn: after the response, the connection's cycle reports a disconnect
            return {"type": "http.disconnect"}

        status = 0

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            if message["type"] == "http.response.body" and not message.get("more_body"):
                answered.set()

        await handler(scope, receive, send)
        await asyncio.sleep(0)  # the disconnect listener's last step
        return status

    async def requests() -> tuple[list[int], int, Counter]:
        await one_request()  # first-use caches (URL resolver, middleware chain) are not garbage
        gc.collect()
        gc.disable()
        try:
            statuses = [await one_request() for _ in range(5)]
            gc.set_debug(gc.DEBUG_SAVEALL)
            unreachable = gc.collect()
            kinds = Counter(type(o).__qualname__ for o in gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        return statuses, unreachable, kinds

    statuses, unreachable, kinds = asyncio.run(requests())
    assert statuses == [401] * 5
    assert unreachable == 0, kinds.most_common(12)
