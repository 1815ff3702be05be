"""`/v1/files` end to end with the `openai` SDK against the live farm; the upload route's streamed size limit."""

from __future__ import annotations

import asyncio
import io
import socket
from urllib.parse import urlparse

import httpx
import openai
import orjson
import pytest

from api.asgi import BodySizeLimit, Message
from tests.conftest import TINY_MODEL


def batch_lines(n: int, **body: object) -> bytes:
    return b"".join(
        orjson.dumps(
            {
                "custom_id": f"req-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": TINY_MODEL, "messages": [{"role": "user", "content": f"hi {i}"}], **body},
            }
        )
        + b"\n"
        for i in range(n)
    )


@pytest.mark.live
def test_sdk_upload_list_retrieve_download_delete(openai_client) -> None:
    content = batch_lines(3, max_tokens=4)
    uploaded = openai_client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch")
    assert uploaded.id.startswith("file-")
    assert (uploaded.object, uploaded.bytes, uploaded.filename) == ("file", len(content), "in.jsonl")
    assert (uploaded.purpose, uploaded.status) == ("batch", "processed")
    assert uploaded.created_at > 1_700_000_000

    listed = [f.id for f in openai_client.files.list(purpose="batch")]
    assert uploaded.id in listed
    assert uploaded.id not in [f.id for f in openai_client.files.list(purpose="fine-tune")]
    assert openai_client.files.retrieve(uploaded.id).model_dump() == uploaded.model_dump()
    assert openai_client.files.content(uploaded.id).read() == content

    deleted = openai_client.files.delete(uploaded.id)
    assert (deleted.id, deleted.deleted) == (uploaded.id, True)
    with pytest.raises(openai.NotFoundError):
        openai_client.files.retrieve(uploaded.id)
    assert uploaded.id not in [f.id for f in openai_client.files.list()]


@pytest.mark.live
def test_fine_tune_upload(openai_client) -> None:
    example = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    uploaded = openai_client.files.create(file=("train.jsonl", orjson.dumps(example) + b"\n"), purpose="fine-tune")
    assert uploaded.purpose == "fine-tune"
    openai_client.files.delete(uploaded.id)


@pytest.mark.live
@pytest.mark.parametrize(
    ("purpose", "content", "fragment"),
    [
        ("batch", batch_lines(2) + b'{"custom_id": "req-0"', "line 3: not valid JSON"),
        ("batch", batch_lines(1) + batch_lines(1), "line 2: duplicate `custom_id` 'req-0'"),
        ("batch", batch_lines(2, temperature=7), "line 1: `body`: Invalid value for 'temperature'"),
        ("batch", batch_lines(1, stream=True), "line 1: `body.stream` is not supported"),
        ("fine-tune", b'{"messages": [{"role": "user", "content": "hi"}]}\n', "line 1: a training example needs"),
    ],
)
def test_validation_errors_name_the_line(openai_client, purpose: str, content: bytes, fragment: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.files.create(file=("bad.jsonl", content), purpose=purpose)
    error = caught.value.body
    assert fragment in error["message"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "file", "invalid_jsonl")


@pytest.mark.live
def test_bad_requests_are_openai_errors(live_farm) -> None:
    headers = {"Authorization": f"Bearer {live_farm.api_key}"}
    response = httpx.post(f"{live_farm.v1}/files", headers=headers, files={"file": ("x", b"{}")}, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "purpose"
    response = httpx.post(f"{live_farm.v1}/files", headers=headers, files={"purpose": (None, "batch")}, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "file"
    response = httpx.post(f"{live_farm.v1}/files", headers=headers, data={"purpose": "batch"}, timeout=30)
    assert response.status_code == 415  # not multipart
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    response = httpx.post(
        f"{live_farm.v1}/files", headers=headers, data={"purpose": "batch_output"}, files={"file": ("x", b"{}")}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "purpose"
    response = httpx.get(f"{live_farm.v1}/files", timeout=30)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


@pytest.mark.live
def test_another_keys_file_is_a_404(openai_client, live_farm) -> None:
    mine = openai_client.files.create(file=("mine.jsonl", batch_lines(1)), purpose="batch")
    other = openai.OpenAI(base_url=live_farm.v1, api_key=live_farm.other_api_key, max_retries=0)
    for call in (other.files.retrieve, other.files.content, other.files.delete):
        with pytest.raises(openai.NotFoundError) as caught:
            call(mine.id)
        assert caught.value.body["code"] == "file_not_found"
    assert mine.id not in [f.id for f in other.files.list()]
    assert openai_client.files.retrieve(mine.id).id == mine.id  # still there
    openai_client.files.delete(mine.id)


@pytest.mark.live
def test_upload_larger_than_the_global_body_limit(openai_client) -> None:
    """The 4 MiB JSON body limit does not apply to uploads: a 6 MiB file goes through, byte for byte."""
    content = bytes(range(256)) * (6 * 1024 * 4)
    uploaded = openai_client.files.create(file=("blob.bin", content), purpose="user_data")
    assert uploaded.bytes == len(content)
    assert openai_client.files.content(uploaded.id).read() == content
    openai_client.files.delete(uploaded.id)


@pytest.mark.live
def test_declared_upload_over_the_limit_is_a_413_before_the_body(live_farm) -> None:
    from settings import env

    url = urlparse(live_farm.base_url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            + f"Authorization: Bearer {live_farm.api_key}\r\n".encode()
            + f"Content-Length: {env.FARM_MAX_UPLOAD_BYTES * 2}\r\n\r\n".encode()
        )
        reply = read_response(sock)
    assert reply.startswith(b"HTTP/1.1 413")
    assert orjson.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"


def read_response(sock: socket.socket) -> bytes:
    """One whole HTTP/1.1 response with a Content-Length (its head and body may come in separate segments)."""
    data = b""
    while True:
        head, separator, body = data.partition(b"\r\n\r\n")
        if separator:
            headers = head.split(b"\r\n")
            lengths = [line.split(b":", 1)[1] for line in headers if line.lower().startswith(b"content-length:")]
            if lengths and len(body) >= int(lengths[0]):
                return data
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


class DjangoLikeApp:
    """Reads the body like Django's ASGI handler: a disconnect before the end means no response at all."""

    def __init__(self) -> None:
        self.body = b""

    async def __call__(self, scope, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            self.body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def drive(path: str, chunks: list[bytes]) -> tuple[DjangoLikeApp, list[Message], int]:
    incoming = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[Message] = []
    reads = 0

    async def receive() -> Message:
        nonlocal reads
        reads += 1
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    app = DjangoLikeApp()
    scope = {"type": "http", "method": "POST", "path": path, "headers": []}
    asyncio.run(BodySizeLimit(app, 10, streamed={"/v1/files": 100})(scope, receive, send))
    return app, sent, reads


def test_streamed_route_passes_bodies_over_the_global_limit() -> None:
    app, sent, _ = drive("/v1/files", [b"x" * 40, b"y" * 40])
    assert app.body == b"x" * 40 + b"y" * 40
    assert sent[0]["status"] == 200


def test_streamed_route_cuts_off_at_its_own_limit_without_reading_the_rest() -> None:
    app, sent, reads = drive("/v1/files", [b"x" * 60, b"y" * 60, b"z" * 60, b"w" * 60])
    assert reads == 2  # stopped at the chunk that crossed the limit
    assert app.body == b"x" * 60  # the app never saw the chunk over the limit
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [413]
    assert orjson.loads(sent[-1]["body"])["error"]["message"].endswith("the limit is 100 bytes.")


def test_other_routes_keep_the_global_limit() -> None:
    _, sent, _ = drive("/v1/chat/completions", [b"x" * 11])
    assert sent[0]["status"] == 413
