"""Request id: taken from `x-request-id` (or made), returned on the response, attached to logs."""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponse

_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class RequestIdMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse | Awaitable[HttpResponse]]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    @staticmethod
    def _request_id(request: HttpRequest) -> str:
        given = request.headers.get("x-request-id", "")
        return given if _SAFE_ID.match(given) else f"req_{uuid.uuid4().hex}"

    def __call__(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        if self.is_async:
            return self._acall(request)
        request.request_id = self._request_id(request)  # type: ignore[attr-defined]
        response = self.get_response(request)
        response["x-request-id"] = request.request_id  # type: ignore[attr-defined,index]
        return response  # type: ignore[return-value]

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        request.request_id = self._request_id(request)  # type: ignore[attr-defined]
        response = await self.get_response(request)  # type: ignore[misc]
        response["x-request-id"] = request.request_id  # type: ignore[attr-defined]
        return response
