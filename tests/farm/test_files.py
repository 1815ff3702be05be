"""File services: JSONL validation with line-numbered errors, storage round trip, owner scoping, size limit, delete."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
import pytest
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile

from farm.errors import InvalidRequest, NotFound
from farm.files import (
    FileTooLarge,
    file_create,
    file_delete,
    file_get,
    file_iter_lines,
    file_list,
    file_open,
    files_storage,
)
from farm.models import File, FilePurpose
from settings import env

pytestmark = pytest.mark.django_db


def batch_line(custom_id: str, **overrides: Any) -> dict[str, Any]:
    line = {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    }
    return {**line, **overrides}


def jsonl(*records: Any) -> bytes:
    return b"\n".join(orjson.dumps(r) for r in records) + b"\n"


@pytest.fixture
def owner():
    return get_user_model().objects.create(username="file-owner")


@pytest.fixture
def other():
    return get_user_model().objects.create(username="file-other")


def test_batch_file_round_trip(owner) -> None:
    content = jsonl(batch_line("a"), batch_line("b", url="/v1/completions", body={"model": "m", "prompt": "x"}))
    upload = SimpleUploadedFile("in.jsonl", content, content_type="application/jsonl")
    file = file_create(owner_id=owner.pk, purpose="batch", filename="in.jsonl", content=upload)
    assert file.id.startswith("file-")
    assert (file.bytes, file.lines, file.sha256) == (len(content), 2, hashlib.sha256(content).hexdigest())
    with file_open(file=file) as handle:
        assert handle.read() == content
    assert [orjson.loads(line)["custom_id"] for line in file_iter_lines(file=file)] == ["a", "b"]
    assert file_get(file_id=file.id, owner_id=owner.pk) == file


@pytest.mark.parametrize(
    ("lines", "number", "fragment"),
    [
        ([batch_line("a"), b"{not json"], 2, "not valid JSON"),
        ([batch_line("a"), batch_line("a")], 2, "duplicate `custom_id`"),
        ([batch_line("a"), batch_line("b"), batch_line("c", method="GET")], 3, "`method`"),
        ([batch_line("a", url="/v1/embeddings")], 1, "`url`"),
        ([batch_line("a", body={"messages": []})], 1, "`body.model`"),
        ([batch_line("a", body=[1])], 1, "`body` must be a JSON object"),
        ([{"method": "POST"}], 1, "`custom_id`"),
        ([[1, 2]], 1, "JSON object"),
        ([batch_line("a", extra=1)], 1, "unknown field"),
    ],
)
def test_batch_validation_names_the_line(owner, lines: list[Any], number: int, fragment: str) -> None:
    content = b"\n".join(line if isinstance(line, bytes) else orjson.dumps(line) for line in lines)
    with pytest.raises(InvalidRequest) as caught:
        file_create(owner_id=owner.pk, purpose="batch", filename="bad.jsonl", content=content)
    assert f"line {number}:" in caught.value.message
    assert fragment in caught.value.message
    assert (caught.value.status, caught.value.param, caught.value.code) == (400, "file", "invalid_jsonl")
    assert not File.objects.filter(owner=owner).exists()


def test_body_check_errors_name_the_line(owner) -> None:
    def check(url: str, body: dict[str, Any]) -> dict[str, Any]:
        if "temperature" in body:
            raise ValueError("Invalid value for 'temperature'")
        return body

    content = jsonl(batch_line("a"), batch_line("b", body={"model": "m", "temperature": 9}))
    with pytest.raises(InvalidRequest, match=r"line 2: `body`: Invalid value for 'temperature'"):
        file_create(owner_id=owner.pk, purpose="batch", filename="x.jsonl", content=content, body_check=check)


def test_fine_tune_validation(owner) -> None:
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    file = file_create(owner_id=owner.pk, purpose="fine-tune", filename="t.jsonl", content=jsonl(good, good))
    assert file.lines == 2
    no_answer = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(InvalidRequest, match="line 3: a training example needs at least one assistant"):
        file_create(owner_id=owner.pk, purpose="fine-tune", filename="t.jsonl", content=jsonl(good, good, no_answer))
    with pytest.raises(InvalidRequest, match=r"line 1: messages\[0\].role"):
        file_create(
            owner_id=owner.pk, purpose="fine-tune", filename="t.jsonl", content=jsonl({"messages": [{"role": "x"}]})
        )
    with pytest.raises(InvalidRequest, match="at least one JSON line"):
        file_create(owner_id=owner.pk, purpose="fine-tune", filename="t.jsonl", content=b"\n\n")


def test_user_data_is_not_parsed(owner) -> None:
    file = file_create(owner_id=owner.pk, purpose="user_data", filename="blob.bin", content=b"\x00\x01 not json")
    assert (file.bytes, file.lines) == (len(b"\x00\x01 not json"), 0)


def test_unknown_purpose(owner) -> None:
    with pytest.raises(InvalidRequest) as caught:
        file_create(owner_id=owner.pk, purpose="assistants", filename="x", content=b"{}")
    assert caught.value.param == "purpose"


def test_size_limit(owner, monkeypatch) -> None:
    monkeypatch.setattr(env, "FARM_MAX_UPLOAD_BYTES", 100)
    with pytest.raises(FileTooLarge) as caught:
        file_create(owner_id=owner.pk, purpose="user_data", filename="big", content=b"x" * 101)
    assert caught.value.status == 413
    file_create(owner_id=owner.pk, purpose="user_data", filename="ok", content=b"x" * 100)


def test_batch_line_limit(owner, monkeypatch) -> None:
    monkeypatch.setattr(env, "FARM_BATCH_MAX_LINES", 2)
    with pytest.raises(InvalidRequest, match="line 3: a batch file may hold at most 2 lines"):
        file_create(
            owner_id=owner.pk, purpose="batch", filename="x", content=jsonl(*(batch_line(str(i)) for i in range(3)))
        )


def test_owner_scoping_and_delete(owner, other) -> None:
    file = file_create(owner_id=owner.pk, purpose="user_data", filename="mine", content=b"abc")
    with pytest.raises(NotFound):
        file_get(file_id=file.id, owner_id=other.pk)
    with pytest.raises(NotFound):
        file_delete(file_id=file.id, owner_id=other.pk)
    assert file_list(owner_id=other.pk) == ([], False)
    assert files_storage().exists(file.storage_name)
    file_delete(file_id=file.id, owner_id=owner.pk)
    with pytest.raises(NotFound):
        file_get(file_id=file.id, owner_id=owner.pk)


@pytest.mark.django_db(transaction=True)
def test_delete_removes_the_bytes_after_commit(owner) -> None:
    file = file_create(owner_id=owner.pk, purpose="user_data", filename="mine", content=b"abc")
    file_delete(file_id=file.id, owner_id=owner.pk)
    assert not files_storage().exists(file.storage_name)


def test_list_pages_and_filters(owner) -> None:
    made = [file_create(owner_id=owner.pk, purpose="user_data", filename=f"f{i}", content=b"x") for i in range(3)]
    made.append(file_create(owner_id=owner.pk, purpose="batch", filename="b", content=jsonl(batch_line("a"))))
    page, more = file_list(owner_id=owner.pk, limit=2)
    assert [f.id for f in page] == [made[3].id, made[2].id] and more
    page, more = file_list(owner_id=owner.pk, limit=2, after=page[-1].id)
    assert [f.id for f in page] == [made[1].id, made[0].id] and not more
    assert [f.id for f in file_list(owner_id=owner.pk, purpose=FilePurpose.BATCH)[0]] == [made[3].id]
    assert [f.id for f in file_list(owner_id=owner.pk, order="asc")[0]] == [f.id for f in made]


def test_ids_that_cannot_exist_are_404s(owner) -> None:
    file_create(owner_id=owner.pk, purpose="user_data", filename="x", content=b"x")
    for bad in ("file-\x00", "x" * 100):
        with pytest.raises(NotFound):
            file_get(file_id=bad, owner_id=owner.pk)
    assert len(file_list(owner_id=owner.pk, after="\x00")[0]) == 1
