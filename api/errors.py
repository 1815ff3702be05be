"""One shape for every API error: OpenAI's `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from redis.exceptions import RedisError
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response

from farm.errors import FarmError
from farm.metrics import LATENCY, REQUESTS

log = logging.getLogger(__name__)


def error_body(*, message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, *, message: str, type: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JsonResponse:
    response = JsonResponse(error_body(message=message, type=type, param=param, code=code), status=status)
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def farm_error_response(exc: FarmError) -> JsonResponse:
    return error_response(exc.status, message=exc.message, type=exc.type, param=exc.param, code=exc.code,
                          headers=exc.headers)


View = Callable[..., Awaitable[HttpResponse]]


def _dependency(exc: Exception) -> str:
    return "database" if isinstance(exc, DatabaseError) else "broker"


def openai_endpoint(*methods: str) -> Callable[[View], View]:
    """Wraps an async view: wrong methods are a 405 body, domain errors their OpenAI error body, anything else a
    logged 500 body. CSRF does not apply (bearer-key auth, no cookies)."""

    def decorate(view: View) -> View:
        @functools.wraps(view)
        async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method not in methods:
                return error_response(405, message=f"Method {request.method} not allowed; use {', '.join(methods)}.",
                                      type="invalid_request_error", code="method_not_allowed",
                                      headers={"Allow": ", ".join(methods)})
            started = time.perf_counter()
            response = await _respond(view, request, *args, **kwargs)
            route = view.__name__
            LATENCY.labels(route=route).observe(time.perf_counter() - started)
            REQUESTS.labels(route=route, model=getattr(request, "farm_model", ""), status=response.status_code).inc()
            return response

        wrapper.csrf_exempt = True  # type: ignore[attr-defined]
        return wrapper

    return decorate


async def _respond(view: View, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
    """The view's response, or the OpenAI error body for whatever it raised."""
    try:
        return await view(request, *args, **kwargs)
    except FarmError as exc:
        return farm_error_response(exc)
    except (DatabaseError, RedisError) as exc:  # a dependency is down: retryable, not a server bug
        name = _dependency(exc)
        log.warning("%s unavailable for %s: %s", name, request.path, exc)
        return error_response(503, message=f"The {name} is unavailable; retry shortly.", type="service_unavailable",
                              code=f"{name}_unavailable", headers={"Retry-After": "5"})
    except Exception:
        log.exception("unhandled error in %s", request.path)
        return error_response(500, message="The server had an error while processing your request.",
                              type="server_error", code="internal_error")


_DRF_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
              405: "invalid_request_error", 409: "conflict_error", 429: "rate_limit_error"}


def drf_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF errors in the same OpenAI shape."""
    if isinstance(exc, FarmError):
        return Response(error_body(message=exc.message, type=exc.type, param=exc.param, code=exc.code),
                        status=exc.status, headers=exc.headers)
    if isinstance(exc, DatabaseError | RedisError):
        name = _dependency(exc)
        return Response(error_body(message=f"The {name} is unavailable; retry shortly.", type="service_unavailable",
                                   code=f"{name}_unavailable"), status=503, headers={"Retry-After": "5"})
    if isinstance(exc, drf_exceptions.APIException):
        status = exc.status_code
        if status == 403 and isinstance(exc, drf_exceptions.NotAuthenticated | drf_exceptions.AuthenticationFailed):
            status = 401
        detail = exc.detail
        param = None
        if isinstance(detail, dict) and detail:
            param, messages = next(iter(detail.items()))
            message = f"{param}: {messages[0] if isinstance(messages, list) else messages}"
        elif isinstance(detail, list) and detail:
            message = str(detail[0])
        else:
            message = str(detail)
        return Response(error_body(message=message, type=_DRF_TYPES.get(status, "invalid_request_error"),
                                   param=param, code=getattr(detail, "code", None)), status=status)
    return None


@csrf_exempt
def not_found(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return error_response(404, message=f"Unknown request URL: {request.method} {request.path}.",
                          type="invalid_request_error", code="unknown_url")


def server_error(request: HttpRequest) -> JsonResponse:
    return error_response(500, message="The server had an error while processing your request.",
                          type="server_error", code="internal_error")
