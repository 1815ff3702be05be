"""Django's stock middleware made cheap on the token API (loaded by Django from settings.MIDDLEWARE, after setup).

Django runs each `MiddlewareMixin` hook of an async request in a worker thread: two thread hops per middleware per
request, ~16 per `/v1/chat/completions` with the stock list, a large share of the API process' CPU under load.
Here the hooks that only read the request and set headers (security, common, clickjacking) run on the event loop,
and the browser-session middleware (sessions, CSRF, user, messages) is skipped on the token API (`TOKEN_API_PATHS`),
where a bearer key is the only credential and there is no session, cookie or form to protect.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.contrib.auth.middleware import AuthenticationMiddleware as DjangoAuthenticationMiddleware
from django.contrib.messages.middleware import MessageMiddleware as DjangoMessageMiddleware
from django.contrib.sessions.middleware import SessionMiddleware as DjangoSessionMiddleware
from django.http import HttpRequest, HttpResponse
from django.middleware.clickjacking import XFrameOptionsMiddleware as DjangoXFrameOptionsMiddleware
from django.middleware.common import CommonMiddleware as DjangoCommonMiddleware
from django.middleware.csrf import CsrfViewMiddleware as DjangoCsrfViewMiddleware
from django.middleware.security import SecurityMiddleware as DjangoSecurityMiddleware

# Paths that programs call with a bearer key (or no credential at all): the OpenAI API, the worker and fleet API,
# probes and the Prometheus scrape. The admin and the API docs (browser pages) are everything else.
TOKEN_API_PATHS = ("/v1/", "/api/jobs/", "/api/job-artifacts", "/api/workers", "/healthz", "/readyz", "/metrics")


def token_api_path(path: str) -> bool:
    return path.startswith(TOKEN_API_PATHS)


class _OnTheLoop:
    """For a Django middleware whose hooks do no I/O (they read the request, set headers): runs them on the event
    loop instead of in a worker thread each."""

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        response = self.process_request(request) if hasattr(self, "process_request") else None
        response = response or await self.get_response(request)  # type: ignore[attr-defined]
        if hasattr(self, "process_response"):
            response = self.process_response(request, response)
        return response


class _BrowserOnly:
    """For a Django middleware that serves browser sessions: the token API skips it (nothing to do there)."""

    def __call__(self, request: HttpRequest) -> Any:
        if token_api_path(request.path_info):
            return self.get_response(request)  # type: ignore[attr-defined]
        return super().__call__(request)  # type: ignore[misc]


class SecurityMiddleware(_OnTheLoop, DjangoSecurityMiddleware):
    pass


class CommonMiddleware(_OnTheLoop, DjangoCommonMiddleware):
    pass


class XFrameOptionsMiddleware(_OnTheLoop, DjangoXFrameOptionsMiddleware):
    pass


class SessionMiddleware(_BrowserOnly, DjangoSessionMiddleware):
    pass


class AuthenticationMiddleware(_BrowserOnly, DjangoAuthenticationMiddleware):
    pass


class MessageMiddleware(_BrowserOnly, DjangoMessageMiddleware):
    pass


class CsrfViewMiddleware(_BrowserOnly, DjangoCsrfViewMiddleware):
    """CSRF for the browser pages. Its view hook is async-native in async mode, so the token API pays no thread hop
    for it; the admin's views are checked in a thread as before."""

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        super().__init__(get_response)
        if self.async_mode:
            self.process_view = self._aprocess_view  # type: ignore[method-assign]

    async def _aprocess_view(self, request: HttpRequest, callback: Any, args: Any, kwargs: Any) -> HttpResponse | None:
        if token_api_path(request.path_info):
            return None
        return await sync_to_async(super().process_view, thread_sensitive=True)(request, callback, args, kwargs)
