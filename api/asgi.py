"""ASGI entry point (`uvicorn api.asgi:application`): Django behind a request-body size guard."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings.django")

import django
import orjson
from django.core.handlers.asgi import ASGIHandler

from api.disconnects import DisconnectWatch
from api.middleware import RequestIdASGI
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


# Async views whose only thread work is Django's own per-request bookkeeping (the request signals' sync receivers,
# `response.close`): the hot path of the farm.
SHARED_THREAD_PATHS = frozenset(("/v1/chat/completions", "/v1/completions"))


class FarmASGIHandler(ASGIHandler):
    """Django's ASGI handler, but the generation endpoints run outside a per-request `ThreadSensitiveContext`.

    Inside one, every thread-sensitive `sync_to_async` of a request (Django's signals and `response.close`, at least
    two per request) goes to an executor made for that request, that is, a new thread per request. Outside it they
    go to asgiref's one shared thread, which only ever runs that bookkeeping here: the views are async and their ORM
    work runs on `farm.db`'s pool. Every other path (the admin, DRF's sync views, uploads) keeps Django's own
    isolation."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") in SHARED_THREAD_PATHS:
            await self.handle(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def _django_application() -> ASGIHandler:
    django.setup(set_prefix=False)  # what `get_asgi_application` does before building its handler
    return FarmASGIHandler()


# Multipart framing around an uploaded file is small; the file's own size is checked exactly by `farm.files`.
UPLOAD_OVERHEAD_BYTES = 64 * 1024

application = RequestIdASGI(
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
