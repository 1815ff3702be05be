"""Files: the bytes behind `/v1/files`, batch input/output files and fine-tuning data and artifacts.

Services (sync; views, tasks and other services call them, nothing else writes `File` rows or their bytes):

- `file_create(*, owner_id, purpose, filename, content, ...)`: validates (size, and JSONL for `batch` / `fine-tune`,
  with errors that name the line), stores the bytes in the `files` storage and creates the row. Farm-produced files
  (batch outputs, fine-tuning results) go through it too, with their own purpose.
- `file_get(*, file_id, owner_id)`: the owner's file or a 404 (another owner's file is indistinguishable from a
  missing one). `owner_id=None` is for the control plane itself (tasks), never for a view.
- `file_list(*, owner_id, purpose, limit, after, order)`: one page of the owner's files.
- `file_open(*, file)`: a binary file object on the stored bytes (close it; `with` works).
- `file_iter_lines(*, file)`: the stored bytes as JSONL lines (bytes, without the newline), streamed.
- `file_delete(*, file_id, owner_id)`: removes the bytes and the row.

Storage is Django's storage API, alias `files` in `settings.STORAGES`: a local directory under FARM_HOME by default,
S3-compatible object storage by setting `FARM_FILES_STORAGE` (see settings/env.py), so workers and API replicas on
other machines see the same bytes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import orjson
from django.core.files import File as DjangoFile
from django.core.files.base import ContentFile
from django.core.files.storage import Storage, storages
from django.db import transaction

from farm.errors import FarmError, InvalidRequest, NotFound
from farm.models import File, FilePurpose, FileStatus
from settings import env

log = logging.getLogger(__name__)

STORAGE_ALIAS = "files"
UPLOAD_PURPOSES = (FilePurpose.FINE_TUNE, FilePurpose.BATCH, FilePurpose.USER_DATA)
BATCH_METHODS = ("POST",)
BATCH_URLS = ("/v1/chat/completions", "/v1/completions")
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

# Checks one batch line's body for its url (the API's request schema) and returns the worker's job request;
# raises ValueError with a message naming the bad field. Supplied by the API layer, which owns the schemas.
BodyCheck = Callable[[str, dict[str, Any]], dict[str, Any]]


class FileTooLarge(FarmError):
    status = 413
    code = "file_too_large"


def files_storage() -> Storage:
    return storages[STORAGE_ALIAS]


@dataclass(frozen=True)
class JsonlStats:
    lines: int
    bytes: int
    sha256: str


def _line_error(number: int, message: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid file: line {number}: {message}", param="file", code="invalid_jsonl")


def _check_batch_line(record: dict[str, Any], number: int, seen: set[str], body_check: BodyCheck | None) -> None:
    custom_id = record.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise _line_error(number, "`custom_id` must be a non-empty string.")
    if len(custom_id) > 512:
        raise _line_error(number, "`custom_id` is longer than 512 characters.")
    if custom_id in seen:
        raise _line_error(number, f"duplicate `custom_id` {custom_id!r}; each line needs a unique one.")
    seen.add(custom_id)
    if record.get("method") not in BATCH_METHODS:
        raise _line_error(number, '`method` must be "POST".')
    url = record.get("url")
    if url not in BATCH_URLS:
        raise _line_error(number, f"`url` must be one of {', '.join(BATCH_URLS)}, not {url!r}.")
    body = record.get("body")
    if not isinstance(body, dict):
        raise _line_error(number, "`body` must be a JSON object.")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _line_error(number, "`body.model` must be a non-empty string.")
    if body.get("stream"):
        raise _line_error(number, "`body.stream` is not supported in a batch.")
    extra = set(record) - {"custom_id", "method", "url", "body"}
    if extra:
        raise _line_error(number, f"unknown field(s) {', '.join(sorted(extra))}.")
    if body_check is not None:
        try:
            body_check(url, body)
        except ValueError as exc:
            raise _line_error(number, f"`body`: {exc}") from None


def _check_fine_tune_line(record: dict[str, Any], number: int) -> None:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _line_error(number, 'expected a chat example {"messages": [...]} with at least one message.')
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _line_error(number, f"messages[{i}] must be an object.")
        if message.get("role") not in CHAT_ROLES:
            raise _line_error(number, f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}.")
        content = message.get("content")
        if not isinstance(content, str):
            raise _line_error(number, f"messages[{i}].content must be a string.")
    if not any(m["role"] == "assistant" for m in messages):
        raise _line_error(number, "a training example needs at least one assistant message.")


def jsonl_validate(
    *, purpose: str, chunks: Iterator[bytes], body_check: BodyCheck | None = None, max_lines: int | None = None
) -> JsonlStats:
    """Reads the whole content once, in chunks (bounded memory), checking every line for `purpose`; raises a 400
    naming the first bad line. Blank lines are skipped (OpenAI tolerates a trailing newline)."""
    digest = hashlib.sha256()
    size = 0
    count = 0
    number = 0
    seen: set[str] = set()
    pending = b""

    def check(raw: bytes) -> None:
        nonlocal count
        if not raw.strip():
            return
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _line_error(number, f"not valid JSON ({exc}).") from None
        if not isinstance(record, dict):
            raise _line_error(number, "each line must be a JSON object.")
        if purpose == FilePurpose.BATCH:
            _check_batch_line(record, number, seen, body_check)
        elif purpose == FilePurpose.FINE_TUNE:
            _check_fine_tune_line(record, number)
        count += 1
        if max_lines is not None and count > max_lines:
            raise _line_error(number, f"a {purpose} file may hold at most {max_lines} lines.")

    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for raw in complete:
            number += 1
            check(raw)
    if pending:
        number += 1
        check(pending)
    if count == 0:
        raise InvalidRequest(
            f"Invalid file: a {purpose} file must hold at least one JSON line.", param="file", code="invalid_jsonl"
        )
    return JsonlStats(lines=count, bytes=size, sha256=digest.hexdigest())


def _digest(chunks: Iterator[bytes]) -> JsonlStats:
    digest = hashlib.sha256()
    size = 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
    return JsonlStats(lines=0, bytes=size, sha256=digest.hexdigest())


def _chunks(content: DjangoFile) -> Iterator[bytes]:
    content.seek(0)
    return content.chunks()


def file_create(
    *,
    owner_id: int,
    purpose: str,
    filename: str,
    content: DjangoFile | bytes,
    api_key_id: int | None = None,
    body_check: BodyCheck | None = None,
    validate: bool = True,
) -> File:
    """Stores a file for its owner. `content` is a Django `File` (an upload: read in chunks, spooled to disk when
    large) or bytes. Uploads of `batch` and `fine-tune` files are JSONL-checked line by line; `validate=False` is
    for files the farm writes itself."""
    if purpose not in FilePurpose.values:
        raise InvalidRequest(
            f"Invalid value for 'purpose': {purpose!r}; expected one of {', '.join(UPLOAD_PURPOSES)}.",
            param="purpose",
            code="invalid_value",
        )
    if isinstance(content, bytes):
        content = ContentFile(content)
    if content.size is not None and content.size > env.FARM_MAX_UPLOAD_BYTES:
        raise FileTooLarge(
            f"The file is {content.size} bytes; the limit is {env.FARM_MAX_UPLOAD_BYTES} bytes.", param="file"
        )
    filename = (filename or "file").replace("/", "_").replace("\\", "_")[:255]
    if validate and purpose in (FilePurpose.BATCH, FilePurpose.FINE_TUNE):
        max_lines = env.FARM_BATCH_MAX_LINES if purpose == FilePurpose.BATCH else None
        stats = jsonl_validate(purpose=purpose, chunks=_chunks(content), body_check=body_check, max_lines=max_lines)
    else:
        stats = _digest(_chunks(content))
    if stats.bytes > env.FARM_MAX_UPLOAD_BYTES:
        raise FileTooLarge(
            f"The file is {stats.bytes} bytes; the limit is {env.FARM_MAX_UPLOAD_BYTES} bytes.", param="file"
        )
    row = File(
        owner_id=owner_id,
        api_key_id=api_key_id,
        purpose=purpose,
        filename=filename,
        bytes=stats.bytes,
        lines=stats.lines,
        sha256=stats.sha256,
        status=FileStatus.PROCESSED,
    )
    content.seek(0)
    row.storage_name = files_storage().save(f"{owner_id}/{row.id}", content)
    try:
        row.save(force_insert=True)
    except Exception:
        files_storage().delete(row.storage_name)  # no orphan bytes when the row cannot be written
        raise
    return row


def file_get(*, file_id: str, owner_id: int | None) -> File:
    """The owner's file, or 404. `owner_id=None`: any owner (control-plane tasks only)."""
    if "\x00" in file_id or len(file_id) > 64:  # not an id (PostgreSQL cannot even compare text with NUL)
        raise NotFound(f"No such File object: {file_id!r}", param="file_id", code="file_not_found")
    rows = File.objects.filter(pk=file_id)
    if owner_id is not None:
        rows = rows.filter(owner_id=owner_id)
    file = rows.first()
    if file is None:
        raise NotFound(f"No such File object: {file_id}", param="file_id", code="file_not_found")
    return file


def file_list(
    *, owner_id: int, purpose: str | None = None, limit: int = 10000, after: str | None = None, order: str = "desc"
) -> tuple[list[File], bool]:
    """One page of the owner's files (newest first unless `order="asc"`) and whether more follow."""
    rows = File.objects.filter(owner_id=owner_id)
    if purpose:
        rows = rows.filter(purpose=purpose)
    ordering = ("created_at", "id") if order == "asc" else ("-created_at", "-id")
    rows = rows.order_by(*ordering)
    if after and "\x00" not in after:
        anchor = File.objects.filter(pk=after, owner_id=owner_id).first()
        if anchor is not None:
            if order == "asc":
                rows = rows.filter(created_at__gte=anchor.created_at).exclude(
                    created_at=anchor.created_at, id__lte=anchor.id
                )
            else:
                rows = rows.filter(created_at__lte=anchor.created_at).exclude(
                    created_at=anchor.created_at, id__gte=anchor.id
                )
    page = list(rows[: limit + 1])
    return page[:limit], len(page) > limit


def file_open(*, file: File) -> IO[bytes]:
    """The stored bytes, as a binary file object (the caller closes it)."""
    return files_storage().open(file.storage_name, "rb")


def file_iter_lines(*, file: File) -> Iterator[bytes]:
    """The stored JSONL, one line at a time (without its newline; blank lines skipped), in bounded memory."""
    with file_open(file=file) as handle:
        pending = b""
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                if raw.strip():
                    yield raw
        if pending.strip():
            yield pending


def file_delete(*, file_id: str, owner_id: int) -> None:
    """Deletes the owner's file: its row now, its bytes once the deletion commits."""
    file = file_get(file_id=file_id, owner_id=owner_id)
    name = file.storage_name
    with transaction.atomic():
        file.delete()
        transaction.on_commit(lambda: _delete_bytes(name))


def _delete_bytes(name: str) -> None:
    try:
        files_storage().delete(name)
    except Exception:  # the row is gone, so the bytes are unreachable; an operator can sweep orphans
        log.warning("could not delete stored file %s", name, exc_info=True)
