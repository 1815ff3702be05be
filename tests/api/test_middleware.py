"""Django's stock middleware, cheap on the token API: no thread hop per hook, no session or CSRF work for a bearer
key; the browser pages (admin) keep sessions, CSRF and the security headers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from asgiref.sync import SyncToAsync
from django.conf import settings
from django.test import AsyncClient
from django.utils.module_loading import import_string

STOCK = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]


def test_every_stock_middleware_is_in_place_as_a_subclass() -> None:
    """The deploy checks silenced in settings (they look for the stock dotted paths) stay true by this test."""
    installed = [import_string(path) for path in settings.MIDDLEWARE]
    for path in STOCK:
        stock = import_string(path)
        assert sum(issubclass(cls, stock) for cls in installed) == 1, path
    assert set(settings.SILENCED_SYSTEM_CHECKS) >= {"security.W001", "security.W002", "security.W003"}


@pytest.fixture
def thread_hops(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Names of the functions Django runs in a worker thread (`sync_to_async`) while the test runs."""
    hops: list[str] = []
    original = SyncToAsync.__call__

    async def counted(self: SyncToAsync, *args: object, **kwargs: object) -> object:
        hops.append(getattr(self.func, "__qualname__", repr(self.func)))
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(SyncToAsync, "__call__", counted)
    yield hops


def _get(path: str, client: AsyncClient | None = None):
    return asyncio.run((client or AsyncClient()).get(path))


@pytest.mark.django_db
def test_a_token_api_request_takes_no_middleware_thread_hop(thread_hops: list[str]) -> None:
    response = _get("/healthz")
    assert response.status_code == 200
    middleware_hops = [name for name in thread_hops if "Middleware" in name or "process_" in name]
    assert middleware_hops == []
    # What is left is Django's request signals and the response close.
    assert len(thread_hops) <= 3, thread_hops
    # The headers of the security middleware are still there; no session or CSRF cookie is made.
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["X-Frame-Options"] == "DENY"
    assert "Set-Cookie" not in response


@pytest.mark.django_db
def test_browser_pages_keep_sessions_and_csrf(thread_hops: list[str]) -> None:
    page = _get("/admin/login/")
    assert page.status_code == 200
    assert "csrftoken" in page.cookies
    assert any("process_view" in name for name in thread_hops)  # the counter sees the admin's hops
    strict = AsyncClient(enforce_csrf_checks=True)
    refused = asyncio.run(strict.post("/admin/login/", {"username": "x", "password": "y"}))
    assert refused.status_code == 403
    assert b"CSRF" in refused.content
    assert page["X-Frame-Options"] == "DENY"


@pytest.mark.django_db
def test_unknown_token_api_paths_are_openai_404s_not_csrf_403s() -> None:
    response = asyncio.run(AsyncClient().post("/v1/no-such-endpoint", data=b"{}", content_type="application/json"))
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"
