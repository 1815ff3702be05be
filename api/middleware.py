"""Request id: taken from `x-request-id` when valid (or made), returned on the response, bound to log lines; and
static files served from the event loop. (Django's stock middleware, made cheap: `api.django_middleware`.)"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.http import HttpRequest, HttpResponse
from whitenoise.middleware import WhiteNoiseMiddleware

from farm.request_ids import request_id_accept, request_id_bound


class StaticFilesMiddleware(WhiteNoiseMiddleware):
    """WhiteNoise (admin and API-docs assets), async-capable. WhiteNoise 6 is sync-only, so Django ran every request
    through it in a worker thread and the rest of the chain back on the loop: two thread hops and a thread pool per
    API request (measured: a third of the API process' time under load). Here only static files leave the loop."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        super().__init__(get_response)
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self._acall(request)
        return super().__call__(request)

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        static_file = self.find_file(request.path_info) if self.autorefresh else self.files.get(request.path_info)
        if static_file is not None:
            return await sync_to_async(self.serve, thread_sensitive=False)(static_file, request)
        return await self.get_response(request)


class RequestIdMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse | Awaitable[HttpResponse]]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        if self.is_async:
            return self._acall(request)
        request.request_id = request_id_accept(request.META.get("HTTP_X_REQUEST_ID"))  # type: ignore[attr-defined]
        with request_id_bound(request.request_id):  # type: ignore[attr-defined]
            response = self.get_response(request)
        response["x-request-id"] = request.request_id  # type: ignore[attr-defined,index]
        return response  # type: ignore[return-value]

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        request.request_id = request_id_accept(request.META.get("HTTP_X_REQUEST_ID"))  # type: ignore[attr-defined]
        with request_id_bound(request.request_id):  # type: ignore[attr-defined]
            response = await self.get_response(request)  # type: ignore[misc]
        response["x-request-id"] = request.request_id  # type: ignore[attr-defined]
        return response


class RequestIdASGI:
    """The outermost ASGI layer: settles the request id before anything can answer (the body-size guard's 413 too)
    and puts it on every response start; Django's `RequestIdMiddleware` then reads the same id from the scope."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope.get("headers") or () if k != b"x-request-id"]
        given = next((v for k, v in scope.get("headers") or () if k == b"x-request-id"), b"")
        request_id = request_id_accept(given.decode("latin-1"))
        scope = {**scope, "headers": [*headers, (b"x-request-id", request_id.encode())]}

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                existing = message.get("headers") or []
                if not any(k.lower() == b"x-request-id" for k, _ in existing):
                    message = {**message, "headers": [*existing, (b"x-request-id", request_id.encode())]}
            await send(message)

        with request_id_bound(request_id):
            await self.app(scope, receive, send_with_id)
