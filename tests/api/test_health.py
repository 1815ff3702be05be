"""Liveness, readiness and the request id every response carries."""

from __future__ import annotations

import re
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import LiveFarm

pytestmark = pytest.mark.live

GENERATED_ID = re.compile(r"^req_[0-9a-f]{32}$")


def test_healthz(live_farm: LiveFarm) -> None:
    response = httpx.get(f"{live_farm.base_url}/healthz", timeout=10)
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


def test_readyz_checks_database_and_broker(live_farm: LiveFarm) -> None:
    response = httpx.get(f"{live_farm.base_url}/readyz", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok"}}


@pytest.mark.parametrize("path", ["/healthz", "/v1/models", "/v1/nope"])
def test_request_id_is_echoed_when_given(live_farm: LiveFarm, path: str) -> None:
    response = httpx.get(f"{live_farm.base_url}{path}", headers={"x-request-id": "client-42.a_b"}, timeout=10)
    assert response.headers["x-request-id"] == "client-42.a_b"


@pytest.mark.parametrize("given", [None, "", "has space", "x" * 129, "a/b", "<script>"])
def test_request_id_is_generated_when_absent_or_unsafe(live_farm: LiveFarm, given: str | None) -> None:
    headers = {} if given is None else {"x-request-id": given}
    first = httpx.get(f"{live_farm.base_url}/healthz", headers=headers, timeout=10).headers["x-request-id"]
    second = httpx.get(f"{live_farm.base_url}/healthz", headers=headers, timeout=10).headers["x-request-id"]
    assert GENERATED_ID.match(first) and GENERATED_ID.match(second)
    assert first != second


def _healthz_on(sock: socket.socket) -> bytes:
    """Sends GET /healthz on an open connection and returns the whole response (b"" if the server closed it)."""
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: farm\r\n\r\n")
    response = b""
    while True:
        head, _, body = response.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        if length and len(body) >= int(length.group(1)):
            return response
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return response
        if not chunk:
            return response
        response += chunk


def test_an_idle_connection_stays_open_longer_than_clients_keep_theirs(live_farm: LiveFarm) -> None:
    """The client, not the API, closes an idle keep-alive connection (httpx, and so the openai SDK, keeps one for
    5 s, aiohttp for 15 s): at uvicorn's default of 5 s a request sent as the server's timer fired was reset."""
    url = urlsplit(live_farm.base_url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        assert _healthz_on(sock).startswith(b"HTTP/1.1 200")
        time.sleep(6)
        assert _healthz_on(sock).startswith(b"HTTP/1.1 200")
