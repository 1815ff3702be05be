"""Liveness, readiness and the request id every response carries."""

from __future__ import annotations

import re

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
