"""One shape for every API error: OpenAI's `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from django.core.exceptions import BadRequest, SuspiciousOperation
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.db import DatabaseError, InterfaceError, OperationalError
from django.http import Http404, HttpRequest, HttpResponse
from django.utils.deprecation import MiddlewareMixin
from django.views.decorators.csrf import csrf_exempt
from redis.exceptions import RedisError
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response

from api.json_response import OrjsonResponse
from farm.errors import FarmError
from farm.metrics import LATENCY, REQUESTS

log = logging.getLogger(__name__)


def error_body(*, message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    status: int,
    *,
    message: str,
    type: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> OrjsonResponse:
    response = OrjsonResponse(error_body(message=message, type=type, param=param, code=code), status=status)
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def farm_error_response(exc: FarmError) -> OrjsonResponse:
    return error_response(
        exc.status, message=exc.message, type=exc.type, param=exc.param, code=exc.code, headers=exc.headers
    )


View = Callable[..., Awaitable[HttpResponse]]


# What "a dependency is down" means: a lost connection (a retry helps), not a query the database refused (a bug or
# bad data, e.g. `DataError`/`ProgrammingError`, which a retry repeats: those are 500s).
UNAVAILABLE = (OperationalError, InterfaceError, RedisError)


def _dependency(exc: Exception) -> str:
    return "broker" if isinstance(exc, RedisError) else "database"


def method_not_allowed(request: HttpRequest, methods: tuple[str, ...]) -> OrjsonResponse:
    return error_response(
        405,
        message=f"Method {request.method} not allowed; use {', '.join(methods)}.",
        type="invalid_request_error",
        code="method_not_allowed",
        headers={"Allow": ", ".join(methods)},
    )


def allow_methods(*methods: str) -> Callable[[View], View]:
    """For plain async views outside the OpenAI families (health, metrics): other methods are an OpenAI-shaped 405
    (HEAD is allowed wherever GET is). CSRF does not apply: these views change nothing."""
    allowed = (*methods, "HEAD") if "GET" in methods and "HEAD" not in methods else methods

    def decorate(view: View) -> View:
        @functools.wraps(view)
        async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method not in allowed:
                return method_not_allowed(request, methods)
            return await view(request, *args, **kwargs)

        wrapper.csrf_exempt = True  # type: ignore[attr-defined]
        return wrapper

    return decorate


def openai_endpoint(*methods: str) -> Callable[[View], View]:
    """Wraps an async view: wrong methods are a 405 body, domain errors their OpenAI error body, anything else a
    logged 500 body. CSRF does not apply (bearer-key auth, no cookies)."""

    def decorate(view: View) -> View:
        @functools.wraps(view)
        async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method not in methods:
                return method_not_allowed(request, methods)
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
    except UNAVAILABLE as exc:  # a dependency is down: retryable, not a server bug
        name = _dependency(exc)
        log.warning("%s unavailable for %s: %s", name, request.path, exc)
        return error_response(
            503,
            message=f"The {name} is unavailable; retry shortly.",
            type="service_unavailable",
            code=f"{name}_unavailable",
            headers={"Retry-After": "5"},
        )
    except Exception:
        log.exception("unhandled error in %s", request.path)
        return error_response(
            500,
            message="The server had an error while processing your request.",
            type="server_error",
            code="internal_error",
        )


_DRF_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    429: "rate_limit_error",
}


def drf_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF errors in the same OpenAI shape."""
    if isinstance(exc, FarmError):
        return Response(
            error_body(message=exc.message, type=exc.type, param=exc.param, code=exc.code),
            status=exc.status,
            headers=exc.headers,
        )
    if isinstance(exc, UNAVAILABLE):
        name = _dependency(exc)
        return Response(
            error_body(
                message=f"The {name} is unavailable; retry shortly.",
                type="service_unavailable",
                code=f"{name}_unavailable",
            ),
            status=503,
            headers={"Retry-After": "5"},
        )
    if isinstance(exc, DatabaseError):  # a refused query (bad data, a bug): the OpenAI 500, not Django's HTML page
        log.error("database error in %s: %s", context.get("request") and context["request"].path, exc, exc_info=exc)
        return Response(
            error_body(
                message="The server had an error while processing your request.",
                type="server_error",
                code="internal_error",
            ),
            status=500,
        )
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
        return Response(
            error_body(
                message=message,
                type=_DRF_TYPES.get(status, "invalid_request_error"),
                param=param,
                code=getattr(detail, "code", None),
            ),
            status=status,
        )
    return None


@csrf_exempt
def not_found(request: HttpRequest, exception: Exception | None = None) -> OrjsonResponse:
    return error_response(
        404,
        message=f"Unknown request URL: {request.method} {request.path}.",
        type="invalid_request_error",
        code="unknown_url",
    )


def server_error(request: HttpRequest) -> OrjsonResponse:
    return error_response(
        500,
        message="The server had an error while processing your request.",
        type="server_error",
        code="internal_error",
    )


class ApiExceptionMiddleware(MiddlewareMixin):
    """Plain Django views under the API paths (file downloads, worker I/O) answer errors in the OpenAI shape too:
    a domain error its status, a lost dependency 503 with Retry-After, anything else a logged JSON 500 (Django's
    handler would answer HTML while DEBUG is on). The admin keeps Django's own pages."""

    API_PREFIXES = ("/v1/", "/api/")

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not request.path.startswith(self.API_PREFIXES):
            return None
        if isinstance(exception, FarmError):
            return farm_error_response(exception)
        if isinstance(exception, Http404):
            return error_response(404, message=str(exception) or "Not found.", type="not_found_error", code="not_found")
        if isinstance(exception, DjangoPermissionDenied):
            return error_response(
                403, message=str(exception) or "Permission denied.", type="permission_error", code="permission_denied"
            )
        if isinstance(exception, BadRequest | SuspiciousOperation):
            return error_response(
                400, message=str(exception) or "Bad request.", type="invalid_request_error", code="bad_request"
            )
        if isinstance(exception, UNAVAILABLE):
            name = _dependency(exception)
            log.warning("%s unavailable for %s: %s", name, request.path, exception)
            return error_response(
                503,
                message=f"The {name} is unavailable; retry shortly.",
                type="service_unavailable",
                code=f"{name}_unavailable",
                headers={"Retry-After": "5"},
            )
        log.error("unhandled error in %s", request.path, exc_info=exception)
        return error_response(
            500,
            message="The server had an error while processing your request.",
            type="server_error",
            code="internal_error",
        )
