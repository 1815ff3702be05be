"""Every API error is an OpenAI error body with the right status, on the wire (httpx) and through the SDK."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import TINY_MODEL, UNSERVED_MODEL, LiveFarm

pytestmark = pytest.mark.live

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Say hello."}]
CHAT_BODY = {"model": TINY_MODEL, "messages": MESSAGES, "max_tokens": 2}
MISSING = object()  # marks a key to drop from `CHAT_BODY`


@pytest.fixture(scope="module")
def http(live_farm: LiveFarm) -> Iterator[httpx.Client]:
    """Raw HTTP with the test key: sees exactly what the server sends."""
    with httpx.Client(
        base_url=live_farm.base_url, headers={"Authorization": f"Bearer {live_farm.api_key}"}, timeout=60
    ) as client:
        yield client


@pytest.fixture
def job_count(django_db_blocker) -> Callable[[], int]:
    """Job rows in the farm's database (the API writes them from its own process)."""
    from farm.models import Job

    def count() -> int:
        with django_db_blocker.unblock():
            return Job.objects.count()

    return count


def assert_error(
    response: httpx.Response,
    status: int,
    *,
    code: str | None,
    type: str = "invalid_request_error",
    param: str | None = None,
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = orjson.loads(response.content)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert (error["type"], error["code"], error["param"]) == (type, code, param)
    return error


def post_chat(http: httpx.Client, **changes: Any) -> httpx.Response:
    body = {key: value for key, value in {**CHAT_BODY, **changes}.items() if value is not MISSING}
    return http.post(CHAT, json=body)


# 401 ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "code"),
    [
        pytest.param(None, "missing_api_key", id="no-header"),
        pytest.param("", "missing_api_key", id="empty-header"),
        pytest.param("Token abc", "missing_api_key", id="not-bearer"),
        pytest.param("Bearer", "missing_api_key", id="bearer-without-key"),
        pytest.param("Basic dXNlcjpwYXNz", "missing_api_key", id="basic-auth"),
        pytest.param("bearer farm-not-a-real-key", "invalid_api_key", id="scheme-is-case-insensitive"),
        pytest.param("Bearer farm-not-a-real-key", "invalid_api_key", id="wrong-key"),
    ],
)
def test_unauthenticated_requests_are_401_and_create_no_job(
    live_farm: LiveFarm,
    job_count: Callable[[], int],
    authorization: str | None,
    code: str,
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    before = job_count()
    response = httpx.post(f"{live_farm.base_url}{CHAT}", json=CHAT_BODY, headers=headers, timeout=30)
    assert_error(response, 401, code=code, type="authentication_error")
    assert job_count() == before


def test_wrong_key_through_the_sdk(live_farm: LiveFarm) -> None:
    client = openai.OpenAI(base_url=live_farm.v1, api_key="farm-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model=TINY_MODEL, messages=MESSAGES)
    assert (caught.value.status_code, caught.value.code) == (401, "invalid_api_key")


def test_authentication_comes_before_body_validation(live_farm: LiveFarm) -> None:
    response = httpx.post(
        f"{live_farm.base_url}{CHAT}",
        content=b"{not json",
        timeout=30,
        headers={"Authorization": "Bearer farm-wrong", "Content-Type": "application/json"},
    )
    assert_error(response, 401, code="invalid_api_key", type="authentication_error")


# 404 ------------------------------------------------------------------------------------------------------------------


def test_unknown_model_is_404_and_creates_no_job(http: httpx.Client, job_count: Callable[[], int]) -> None:
    before = job_count()
    error = assert_error(post_chat(http, model="no-such-model"), 404, code="model_not_found", param="model")
    assert "no-such-model" in error["message"]
    assert job_count() == before


def test_unknown_model_through_the_sdk(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        openai_client.completions.create(model="no-such-model", prompt="hi")
    assert (caught.value.code, caught.value.param) == ("model_not_found", "model")


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
@pytest.mark.parametrize("path", ["/v1/nope", "/v1/embeddings", "/v1/chat/completions/extra"])
def test_unknown_v1_url_is_a_json_404(http: httpx.Client, method: str, path: str) -> None:
    response = http.request(method, path, json={"model": TINY_MODEL} if method == "POST" else None)
    error = assert_error(response, 404, code="unknown_url")
    assert path in error["message"]


# 405 ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", CHAT, "POST"),
        ("PUT", CHAT, "POST"),
        ("GET", "/v1/completions", "POST"),
        ("POST", "/v1/models", "GET"),
    ],
)
def test_wrong_method_is_405_with_allow(http: httpx.Client, method: str, path: str, allowed: str) -> None:
    response = http.request(method, path, json={} if method != "GET" else None)
    assert_error(response, 405, code="method_not_allowed")
    assert response.headers["allow"] == allowed


# 400: parameters ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "param", "code"),
    [
        pytest.param({"max_tokens": -1}, "max_tokens", "invalid_value", id="negative-max-tokens"),
        pytest.param({"max_tokens": 0}, "max_tokens", "invalid_value", id="zero-max-tokens"),
        pytest.param({"max_tokens": 1_000_001}, "max_tokens", "invalid_value", id="max-tokens-over-cap"),
        pytest.param({"max_tokens": 10**30}, "max_tokens", "invalid_value", id="max-tokens-beyond-64-bit"),
        pytest.param(
            {"max_completion_tokens": 0}, "max_completion_tokens", "invalid_value", id="zero-max-completion-tokens"
        ),
        pytest.param(
            {"max_tokens": MISSING, "max_completion_tokens": 1_000_001},
            "max_completion_tokens",
            "invalid_value",
            id="max-completion-tokens-over-cap",
        ),
        pytest.param({"max_tokens": "5"}, "max_tokens", "invalid_value", id="max-tokens-string"),
        pytest.param({"max_tokens": 5.5}, "max_tokens", "invalid_value", id="max-tokens-float"),
        pytest.param({"temperature": 3}, "temperature", "invalid_value", id="temperature-3"),
        pytest.param({"temperature": -0.1}, "temperature", "invalid_value", id="negative-temperature"),
        pytest.param({"temperature": "hot"}, "temperature", "invalid_value", id="temperature-string"),
        pytest.param({"top_p": 0}, "top_p", "invalid_value", id="top-p-0"),
        pytest.param({"top_p": 1.5}, "top_p", "invalid_value", id="top-p-over-1"),
        pytest.param({"presence_penalty": 2.5}, "presence_penalty", "invalid_value", id="presence-penalty"),
        pytest.param({"timeout": 0}, "timeout", "invalid_value", id="zero-timeout"),
        pytest.param({"n": 2}, "n", "invalid_value", id="n-2"),
        pytest.param({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value", id="five-stop-strings"),
        pytest.param({"stop": [""]}, "stop", "invalid_value", id="empty-stop-string"),
        pytest.param({"stop": 5}, "stop", "invalid_value", id="stop-not-text"),
        pytest.param({"stream": "yes"}, "stream", "invalid_value", id="stream-string"),
        pytest.param(
            {"stream_options": {"include_usage": True, "extra": 1}},
            "stream_options.extra",
            "unknown_parameter",
            id="unknown-stream-option",
        ),
        pytest.param({"frobnicate": True}, "frobnicate", "unknown_parameter", id="unknown-parameter"),
        pytest.param({"logprobs": True}, "logprobs", "invalid_value", id="logprobs"),
        pytest.param({"messages": []}, "messages", "invalid_value", id="empty-messages"),
        pytest.param({"messages": "Say hello."}, "messages", "invalid_value", id="messages-not-a-list"),
        pytest.param(
            {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role", "invalid_value", id="unknown-role"
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": 5}]}, "messages.0.content", "invalid_value", id="content-not-text"
        ),
        pytest.param({"model": ""}, "model", "invalid_value", id="empty-model"),
        pytest.param({"model": None}, "model", "invalid_value", id="null-model"),
        pytest.param({"model": MISSING}, "model", "missing_required_parameter", id="missing-model"),
        pytest.param({"messages": MISSING}, "messages", "missing_required_parameter", id="missing-messages"),
    ],
)
def test_invalid_parameters_are_400_naming_the_parameter(
    http: httpx.Client,
    job_count: Callable[[], int],
    changes: dict[str, Any],
    param: str,
    code: str,
) -> None:
    before = job_count()
    assert_error(post_chat(http, **changes), 400, code=code, param=param)
    assert job_count() == before


def test_invalid_parameter_through_the_sdk(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(model=TINY_MODEL, messages=MESSAGES, temperature=3)
    assert (caught.value.status_code, caught.value.param, caught.value.code) == (400, "temperature", "invalid_value")


# 400: bodies ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "content_type", "code"),
    [
        pytest.param(b'{"model": "tiny-llama", ', "application/json", "invalid_json", id="invalid-json"),
        pytest.param(b"", "application/json", "invalid_json", id="empty-body"),
        pytest.param(b'[{"model": "tiny-llama"}]', "application/json", "invalid_json", id="array-body"),
        pytest.param(b'"hello"', "application/json", "invalid_json", id="string-body"),
        pytest.param(b"null", "application/json", "invalid_json", id="null-body"),
        pytest.param(
            b'{"model": "tiny-\xff\xfe-llama", "messages": []}', "application/json", "invalid_json", id="invalid-utf8"
        ),
        pytest.param(b'{"model": "tiny-llama", "temperature": NaN}', "application/json", "invalid_json", id="nan"),
        pytest.param(
            b'{"model": "tiny-llama", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "application/json",
            "invalid_json",
            id="deeply-nested",
        ),
        pytest.param(orjson.dumps(CHAT_BODY), "text/plain", "invalid_content_type", id="text-plain"),
        pytest.param(orjson.dumps(CHAT_BODY), "application/x-www-form-urlencoded", "invalid_content_type", id="form"),
        pytest.param(orjson.dumps(CHAT_BODY), None, "invalid_content_type", id="no-content-type"),
    ],
)
def test_unreadable_bodies_are_400(http: httpx.Client, content: bytes, content_type: str | None, code: str) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    assert_error(http.post(CHAT, content=content, headers=headers), 400, code=code)


def test_json_with_a_charset_is_accepted(http: httpx.Client) -> None:
    response = http.post(
        CHAT, content=orjson.dumps(CHAT_BODY), headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert response.status_code == 200, response.text


# 400: too long for the model ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "max_tokens"),
    [
        pytest.param("Say hello.", 1024, id="max-tokens-fills-the-context"),
        pytest.param("hello " * 1100, None, id="prompt-fills-the-context"),
    ],
)
def test_prompt_plus_max_tokens_over_the_context_is_400(
    http: httpx.Client,
    openai_client: openai.OpenAI,
    content: str,
    max_tokens: int | None,
) -> None:
    messages = [{"role": "user", "content": content}]
    response = post_chat(http, messages=messages, max_tokens=max_tokens if max_tokens else MISSING)
    error = assert_error(response, 400, code="context_length_exceeded")
    assert "1024" in error["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(model=TINY_MODEL, messages=messages, max_tokens=max_tokens)
    assert caught.value.code == "context_length_exceeded"


def test_max_tokens_that_just_fits_is_accepted(openai_client: openai.OpenAI, tiny_tokenizer) -> None:
    prompt = tiny_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    room = 1024 - len(tiny_tokenizer.encode(prompt, add_special_tokens=False))
    response = openai_client.chat.completions.create(
        model=TINY_MODEL, messages=MESSAGES, max_tokens=room, temperature=0, stop=["a", "e", "o", " "]
    )
    assert response.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError):
        openai_client.chat.completions.create(model=TINY_MODEL, messages=MESSAGES, max_tokens=room + 1)


# 413 ------------------------------------------------------------------------------------------------------------------


def oversized_chunks(total: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b" " * min(chunk, total - sent)
        sent += chunk


def test_body_over_the_limit_with_content_length_is_413(http: httpx.Client) -> None:
    from settings import env

    body = orjson.dumps({**CHAT_BODY, "user": "x" * env.FARM_MAX_BODY_BYTES})
    response = http.post(CHAT, content=body, headers={"Content-Type": "application/json"})
    assert "content-length" in response.request.headers
    assert_error(response, 413, code="request_too_large")


def test_chunked_body_over_the_limit_is_413(http: httpx.Client) -> None:
    from settings import env

    response = http.post(
        CHAT, content=oversized_chunks(env.FARM_MAX_BODY_BYTES + 1), headers={"Content-Type": "application/json"}
    )
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_error(response, 413, code="request_too_large")


def test_body_just_under_the_limit_is_read(http: httpx.Client) -> None:
    from settings import env

    prefix = orjson.dumps(CHAT_BODY)[:-1] + b', "user": "'
    body = prefix + b"x" * (env.FARM_MAX_BODY_BYTES - len(prefix) - 2) + b'"}'
    assert len(body) == env.FARM_MAX_BODY_BYTES
    assert http.post(CHAT, content=body, headers={"Content-Type": "application/json"}).status_code == 200


# 503 ------------------------------------------------------------------------------------------------------------------


def test_model_nobody_serves_is_503_with_retry_after(http: httpx.Client, job_count: Callable[[], int]) -> None:
    before = job_count()
    response = post_chat(http, model=UNSERVED_MODEL)
    assert_error(response, 503, code="no_capacity", type="service_unavailable")
    assert int(response.headers["retry-after"]) > 0
    assert job_count() == before


def test_model_nobody_serves_through_the_sdk(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        openai_client.completions.create(model=UNSERVED_MODEL, prompt="hi")
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"]
