"""Request ids: one per API request (`x-request-id` in and out), stored on its job, carried in the job's task message
and attached to every log line written while serving it, on the API and on the worker (import-light: workers use it).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar, Token
from typing import Any

MAX_LENGTH = 128
# Printable, header- and log-safe: letters, digits and `._:-` (a client's UUID, ULID or trace id fits).
_VALID = re.compile(rf"^[A-Za-z0-9._:-]{{1,{MAX_LENGTH}}}$")

current_request_id: ContextVar[str] = ContextVar("farm_request_id", default="")


def request_id_new() -> str:
    return f"req_{uuid.uuid4().hex}"


def request_id_accept(given: str | None) -> str:
    """The client's id when it is valid (1-128 characters of `A-Za-z0-9._:-`), else a new one."""
    return given if given and _VALID.match(given) else request_id_new()


@contextmanager
def request_id_bound(request_id: str) -> Iterator[None]:
    """Log lines written inside carry `request_id` (per thread / asyncio task, via a context variable)."""
    token = current_request_id.set(request_id)
    try:
        yield
    finally:
        current_request_id.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id` (`-` outside a request) so formats can print `%(request_id)s`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = current_request_id.get() or "-"
        return True


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def logging_add_request_id(fmt: str = LOG_FORMAT) -> None:
    """For processes configured with `logging.basicConfig` (workers): every root handler prints the request id."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
        handler.setFormatter(logging.Formatter(fmt))


# --- through Celery: a task published while a request id is bound carries it in a message header; the process that
# runs the task binds it for the task's duration (worker log lines, and the events and tasks that task sends on).
CELERY_HEADER = "farm_request_id"
_bound: dict[str, Token[str]] = {}


def _publish_with_request_id(headers: dict[str, Any] | None = None, **_: Any) -> None:
    request_id = current_request_id.get()
    if request_id and headers is not None:
        headers.setdefault(CELERY_HEADER, request_id)


def _bind_task(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    request_id = task.request.get(CELERY_HEADER) if task is not None else None
    if task_id is not None:
        _bound[task_id] = current_request_id.set(request_id or "")


def _unbind_task(task_id: str | None = None, **_: Any) -> None:
    token = _bound.pop(task_id, None) if task_id is not None else None
    if token is not None:
        with suppress(ValueError):  # a task finished in another context than it started: leave the value
            current_request_id.reset(token)


def celery_carry_request_ids() -> None:
    """Connects the Celery signals (once per process, whatever the number of apps)."""
    from celery import signals

    signals.before_task_publish.connect(_publish_with_request_id, weak=False, dispatch_uid="farm-request-id-publish")
    signals.task_prerun.connect(_bind_task, weak=False, dispatch_uid="farm-request-id-prerun")
    signals.task_postrun.connect(_unbind_task, weak=False, dispatch_uid="farm-request-id-postrun")
