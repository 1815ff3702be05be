"""ASGI entry point (`uvicorn api.asgi:application`): Django behind a request-body size guard."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings.django")

import django
import orjson
from django.conf import settings
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.http.response import HttpResponseBase
from django.urls import get_resolver, set_script_prefix, set_urlconf
from django.utils.log import log_response

from api.disconnects import DisconnectWatch
from api.middleware import RequestIdASGI
from api.sse import SseResponse, sse_send
from farm.garbage_collection import freeze_startup
from settings import env

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodySizeLimit:
    """Answers 413 for bodies over `max_bytes`, declared or chunked, holding at most `max_bytes` in memory.

    Paths in `streamed` (uploads) get their own, larger limit and are not buffered here: their body passes through
    as it arrives (Django spools it to a temporary file), counted, and cut off with a 413 once over the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int, *, streamed: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.streamed = streamed or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        limit = self.streamed.get(scope.get("path", ""))
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > (limit or self.max_bytes):
            await self._reject(send, limit or self.max_bytes)
            return
        if limit is not None:
            await self._stream(scope, receive, send, limit)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(send, self.max_bytes)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _stream(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Passes the body through as it arrives; over `limit`, the app sees a disconnect (Django then drops the
        request without answering) and the client gets the 413."""
        size = 0
        over = False
        answered = False

        async def counted() -> Message:
            nonlocal size, over
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > limit:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            nonlocal answered
            if over and not answered:
                return
            answered = True
            await send(message)

        await self.app(scope, counted, guarded)
        if over and not answered:
            await self._reject(send, limit)

    async def _reject(self, send: Send, limit: int) -> None:
        payload = orjson.dumps(
            {
                "error": {
                    "message": f"Request body too large: the limit is {limit} bytes.",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "request_too_large",
                }
            }
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


# The farm's hot path: async views whose database work runs on `farm.db`'s pool, never on the event loop's thread.
ON_THE_LOOP_PATHS = frozenset(("/v1/chat/completions", "/v1/completions"))


class FarmASGIHandler(ASGIHandler):
    """Django's ASGI handler; the generation endpoints are handled without a thread hop (`handle_on_the_loop`), and
    their SSE streams end with their last chunk (`api.sse`)."""

    async def send_response(self, response: HttpResponseBase, send: Send) -> None:
        if isinstance(response, SseResponse):
            await sse_send(response, send)
        else:
            await super().send_response(response, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") in ON_THE_LOOP_PATHS:
            await self.handle_on_the_loop(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    async def handle_on_the_loop(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Django's `ASGIHandler.handle` (same body spooling, request, middleware chain, URL resolution, view,
        response, disconnect listener and cancellation), without its thread hops.

        Django sends every request through two or three `sync_to_async` calls: the `request_started` and
        `request_finished` signals' sync receivers, `response.close`, and the log line of an error response. Each is
        a round trip through a worker thread; with the per-request `ThreadSensitiveContext` each was a new thread.
        Measured in-process (2026-12-02, a 401 answered by the chat view): 768 us of CPU per request through
        `handle`, 33 us for the view alone. Here the response is closed and the log line written inline, and the two
        signals are not sent: their receivers (`reset_queries`, `close_old_connections`, `close_caches`) only act on
        the calling thread's database connections and caches, and the event loop's thread has none (Django refuses
        a query from async code; these views query on `farm.db`'s pool, which checks its own connections). Sent
        inline they still cost ~30 us each per request (`connections.all()` through asgiref's thread-critical
        locals: BENCHMARKS.md, 2026-12-08). Every other path keeps Django's own `handle`."""
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            body_file.close()
            await self.send_response(error_response, send)
            error_response.close()
            return

        async def process_request() -> HttpResponseBase:
            set_urlconf(settings.ROOT_URLCONF)
            response = await self._middleware_chain(request)
            response._handler_class = self.__class__
            response._resource_closers.append(request.close)
            if response.status_code >= 400:
                log_response("%s: %s", response.reason_phrase, request.path, response=response, request=request)
            with contextlib.suppress(asyncio.CancelledError):  # the client left while the response was sent
                await self.send_response(response, send)
            return response

        # As Django: a disconnect while the view runs cancels it (a stream's job is canceled by `DisconnectWatch`).
        tasks = [
            asyncio.create_task(client_gone(receive)),
            asyncio.create_task(process_request()),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done():
                task.result()
            else:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with contextlib.suppress(asyncio.CancelledError):
            _close_quietly(tasks[1].result())
        body_file.close()


def _close_quietly(response: HttpResponseBase) -> None:
    """`response.close()` without the `request_finished` signal (see `FarmASGIHandler.handle_on_the_loop`)."""
    for closer in response._resource_closers:
        with contextlib.suppress(Exception):
            closer()
    response._resource_closers.clear()
    response.closed = True


class Lifespan:
    """The ASGI lifespan protocol, which Django's handler does not speak. At start-up, with every view imported,
    what the API loaded is frozen out of the collector's full collections (`farm.garbage_collection`: ~100 ms event
    loop pauses every few seconds under load, before)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                get_resolver().url_patterns  # noqa: B018  (imports the views now, not on their first request)
                freeze_startup("api")
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


async def client_gone(receive: Receive) -> None:
    """Returns once the client has disconnected (or, as uvicorn says, once the response is complete).

    Django's `listen_for_disconnect` raises `RequestAborted` instead: one exception per request, whose traceback
    held the handler's frame and so the request, the response and their tasks in a reference cycle that only the
    garbage collector could free (~72 objects per request, found with `gc.DEBUG_SAVEALL`, 2026-12-03)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _django_application() -> ASGIHandler:
    django.setup(set_prefix=False)  # what `get_asgi_application` does before building its handler
    return FarmASGIHandler()


# Multipart framing around an uploaded file is small; the file's own size is checked exactly by `farm.files`.
UPLOAD_OVERHEAD_BYTES = 64 * 1024

application = Lifespan(
    RequestIdASGI(
        DisconnectWatch(  # a stream's job is canceled the moment its client leaves
            BodySizeLimit(  # the request id goes on every response, this guard's 413 included
                _django_application(),
                env.FARM_MAX_BODY_BYTES,
                streamed={
                    "/v1/files": env.FARM_MAX_UPLOAD_BYTES + UPLOAD_OVERHEAD_BYTES,
                    "/api/job-artifacts": env.FARM_MAX_ARTIFACT_BYTES + UPLOAD_OVERHEAD_BYTES,
                },  # fine-tuned adapters
            )
        )
    )
)
