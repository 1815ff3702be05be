"""Hostile or careless input never breaks the farm: one test per class of bad input, on the wire against a live farm
(the classes `test_errors.py` already covers, such as invalid parameters, invalid JSON, wrong content types and
deep nesting beyond the parser's limit, are not repeated here)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import psutil
import pytest
from django.db import DataError, InterfaceError, OperationalError, ProgrammingError
from django.http import Http404
from django.test import RequestFactory

from api.errors import openai_endpoint
from farm.errors import NotFound
from tests.conftest import TINY_MODEL, LiveFarm

CHAT = "/v1/chat/completions"
CHAT_BODY: dict[str, Any] = {
    "model": TINY_MODEL,
    "messages": [{"role": "user", "content": "Say hello."}],
    "max_tokens": 2,
}


@pytest.fixture(scope="module")
def http(live_farm: LiveFarm) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=live_farm.base_url, headers={"Authorization": f"Bearer {live_farm.api_key}"}, timeout=60
    ) as client:
        yield client


@pytest.fixture
def job_count(django_db_blocker) -> Callable[[], int]:
    from farm.models import Job

    def count() -> int:
        with django_db_blocker.unblock():
            return Job.objects.count()

    return count


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = orjson.loads(response.content)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# NUL characters -------------------------------------------------------------------------------------------------------


@pytest.mark.live
@pytest.mark.parametrize(
    ("changes", "param"),
    [
        pytest.param({"messages": [{"role": "user", "content": "a\u0000b"}]}, "messages.0.content", id="in-content"),
        pytest.param(
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "\u0000"}]}]},
            "messages.0.content.0.text",
            id="in-content-part",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": "hi", "name": "\u0000"}]}, "messages.0.name", id="in-name"
        ),
        pytest.param({"model": "tiny\u0000llama"}, "model", id="in-model"),
        pytest.param({"stop": ["\u0000"]}, "stop.0", id="in-stop"),
        pytest.param({"user": "\u0000"}, "user", id="in-user"),
        pytest.param({"metadata": {"k": "\u0000"}}, "metadata.k", id="in-an-unknown-field"),
    ],
)
def test_nul_characters_in_text_are_a_400_naming_the_field(
    http: httpx.Client,
    job_count: Callable[[], int],
    changes: dict[str, Any],
    param: str,
) -> None:
    """PostgreSQL cannot store U+0000 in a job's request: any JSON body holding one is refused up front, naming
    where (it used to be a 503 'database unavailable' after the row insert failed)."""
    before = job_count()
    error = error_of(http.post(CHAT, json={**CHAT_BODY, **changes}), 400)
    assert (error["param"], error["code"]) == (param, "invalid_value")
    assert "NUL" in error["message"]
    assert job_count() == before


@pytest.mark.live
def test_nul_in_a_completion_prompt_is_a_400(http: httpx.Client) -> None:
    error = error_of(http.post("/v1/completions", json={"model": TINY_MODEL, "prompt": ["\u0000"]}), 400)
    assert error["param"] == "prompt.0"


@pytest.mark.live
def test_raw_nul_byte_in_the_body_is_invalid_json(http: httpx.Client) -> None:
    body = orjson.dumps(CHAT_BODY).replace(b"Say hello.", b"Say\x00hello.")
    error = error_of(http.post(CHAT, content=body, headers={"Content-Type": "application/json"}), 400)
    assert error["code"] == "invalid_json"


@pytest.mark.live
@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v1/models/tiny%00llama", 404),
        ("/v1/jobs?after=%00", 400),
        ("/v1/jobs?status=%00", 400),
        ("/v1/jobs/%00", 404),
    ],
)
def test_nul_in_urls_is_a_4xx(http: httpx.Client, path: str, status: int) -> None:
    error_of(http.get(path), status)


# Job list filters -----------------------------------------------------------------------------------------------------


@pytest.mark.live
@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("after=not-a-uuid", "after"),
        ("status=nonsense", "status"),
        ("limit=many", "limit"),
    ],
)
def test_bad_job_list_filters_are_a_400(http: httpx.Client, query: str, param: str) -> None:
    error = error_of(http.get(f"/v1/jobs?{query}"), 400)
    assert error["param"] == param


@pytest.mark.live
def test_empty_job_list_filters_are_absent_ones(http: httpx.Client) -> None:
    """As DRF serializers read query strings (and as the schema says: `allowEmptyValue`)."""
    assert http.get("/v1/jobs?after=&status=&limit=").json()["object"] == "list"


# Deep nesting within the parser's limit -------------------------------------------------------------------------------


@pytest.mark.live
@pytest.mark.parametrize("field", ["messages", "stop", "stream_options", "user"])
def test_nesting_the_parser_accepts_is_still_a_400(http: httpx.Client, field: str) -> None:
    nested = b"[" * 1000 + b"]" * 1000  # orjson parses up to 1024 levels; validation must not recurse into them
    body = orjson.dumps({k: v for k, v in CHAT_BODY.items() if k != field})[:-1] + b', "' + field.encode() + b'": '
    response = http.post(CHAT, content=body + nested + b"}", headers={"Content-Type": "application/json"})
    assert error_of(response, 400)["param"].startswith(field)


# Empty prompt ---------------------------------------------------------------------------------------------------------


@pytest.mark.live
def test_empty_prompt_starts_from_the_bos_token(openai_client) -> None:
    """An empty prompt encodes to no tokens, which vLLM refuses; it used to fail the job three times and answer 503.
    OpenAI reads a missing prompt as the start of a document: so does the farm."""
    response = openai_client.completions.create(model=TINY_MODEL, prompt="", max_tokens=3)
    assert response.usage.prompt_tokens == 1
    assert response.choices[0].finish_reason in ("length", "stop")


# Wrong methods on every kind of view ----------------------------------------------------------------------------------


@pytest.mark.live
@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/healthz", "GET"),
        ("DELETE", "/readyz", "GET"),
        ("PUT", "/metrics", "GET"),
        ("DELETE", "/v1/jobs", "GET, OPTIONS"),
        ("GET", "/v1/jobs/00000000-0000-0000-0000-000000000000/cancel", "POST, OPTIONS"),
        ("PATCH", "/v1/models/tiny-llama", "GET"),
    ],
)
def test_wrong_method_is_an_openai_405_everywhere(http: httpx.Client, method: str, path: str, allowed: str) -> None:
    response = http.request(method, path)
    error = error_of(response, 405)
    assert error["type"] == "invalid_request_error"
    assert set(response.headers["allow"].split(", ")) == set(allowed.split(", "))


@pytest.mark.live
def test_health_answers_head(http: httpx.Client) -> None:
    assert http.head("/healthz").status_code == 200


# Oversized bodies hold bounded memory ---------------------------------------------------------------------------------


def _raw_post(base_url: str, head: bytes, chunks: Iterator[bytes]) -> bytes:
    """Sends a request over a raw socket, body chunk by chunk, stopping when the server closes; returns the reply."""
    url = urlsplit(base_url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(head)
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered 413 and closed: what we want
        reply = b""
        try:
            while part := sock.recv(65536):
                reply += part
        except (ConnectionResetError, TimeoutError):
            pass
        return reply


@pytest.mark.live
@pytest.mark.parametrize("framing", ["chunked", "until-close"])
def test_huge_bodies_without_content_length_are_413_with_bounded_memory(live_farm: LiveFarm, framing: str) -> None:
    """64 MiB sent to a 4 MiB limit, chunked or as an HTTP/1.0 body ending at close: the API answers 413 and its
    memory grows by far less than the body."""
    api = psutil.Process(live_farm.processes.children["api"].pid)
    before = api.memory_info().rss
    total, size = 64 * 1024 * 1024, 256 * 1024
    block = b"x" * size

    def chunks() -> Iterator[bytes]:
        for _ in range(total // size):
            yield (f"{size:x}\r\n".encode() + block + b"\r\n") if framing == "chunked" else block
        if framing == "chunked":
            yield b"0\r\n\r\n"

    if framing == "chunked":
        head = (
            f"POST {CHAT} HTTP/1.1\r\nHost: farm\r\nAuthorization: Bearer {live_farm.api_key}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
    else:
        head = (
            f"POST {CHAT} HTTP/1.0\r\nHost: farm\r\nAuthorization: Bearer {live_farm.api_key}\r\n"
            "Content-Type: application/json\r\n\r\n"
        ).encode()
    started = time.monotonic()
    reply = _raw_post(live_farm.base_url, head, chunks())
    grew = api.memory_info().rss - before
    if framing == "chunked":
        assert reply.startswith(b"HTTP/1.1 413"), reply[:300]
        assert b'"code":"request_too_large"' in reply
    else:
        # HTTP/1.0 without Content-Length: the server (h11) refuses the framing itself, before any body is read.
        assert reply.split(b" ", 2)[1] in (b"400", b"411", b"413"), reply[:300]
    took = time.monotonic() - started
    print(f"\n{framing}: 64 MiB body -> {reply[:12].decode()} in {took:.2f}s, API RSS grew {grew / 2**20:.1f} MiB")
    assert grew < 24 * 1024 * 1024, f"API memory grew by {grew / 2**20:.1f} MiB for a 64 MiB body"
    assert took < 60


# Which database errors are "unavailable" ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (OperationalError("connection refused"), 503, "database_unavailable"),
        (InterfaceError("connection already closed"), 503, "database_unavailable"),
        (DataError("unsupported Unicode escape sequence"), 500, "internal_error"),
        (ProgrammingError("column does not exist"), 500, "internal_error"),
    ],
)
def test_only_a_lost_database_is_a_retryable_503(exc: Exception, status: int, code: str) -> None:
    """A refused query is a bug or bad data that a retry repeats: a 500, not 'retry shortly'."""
    import asyncio

    @openai_endpoint("POST")
    async def failing(request: object) -> None:
        raise exc

    response = asyncio.run(failing(RequestFactory().post("/v1/x", data=b"{}", content_type="application/json")))
    body = orjson.loads(response.content)
    assert (response.status_code, body["error"]["code"]) == (status, code)
    assert ("Retry-After" in response) == (status == 503)


@pytest.mark.parametrize(
    ("path", "exc", "status", "code"),
    [
        ("/v1/files/x/content", OperationalError("too many clients"), 503, "database_unavailable"),
        ("/api/jobs/x/adapter", DataError("bad data"), 500, "internal_error"),
        ("/v1/files/x/content", NotFound("No such file.", code="file_not_found"), 404, "file_not_found"),
        ("/v1/files/x/content", Http404("No File matches the given query."), 404, "not_found"),
    ],
)
def test_plain_views_under_the_api_answer_openai_errors(path: str, exc: Exception, status: int, code: str) -> None:
    """Views outside `openai_endpoint` and DRF (file downloads, worker I/O) used to answer Django's HTML pages."""
    from api.errors import ApiExceptionMiddleware

    middleware = ApiExceptionMiddleware(lambda request: None)
    response = middleware.process_exception(RequestFactory().get(path), exc)
    assert response is not None
    assert (response.status_code, orjson.loads(response.content)["error"]["code"]) == (status, code)
    assert middleware.process_exception(RequestFactory().get("/admin/"), exc) is None  # the admin keeps Django's
