"""The shared path of chat and text completions: authenticate, validate, submit, then stream or collect.

Each family supplies a `Shaper` that turns stream events into its OpenAI chunk and response objects.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse
from redis.exceptions import RedisError

from api.auth import authenticate
from api.body import json_body, validate
from api.disconnects import on_client_disconnect
from api.json_response import OrjsonResponse
from api.openai.sampling import SamplingRequest
from api.sse import DONE, SseResponse
from farm import jobs
from farm.api_keys import KeyPrincipal, api_key_check_request
from farm.db import run_db
from farm.errors import FarmError
from farm.inference import Submission, inference_submit
from farm.job_streams import job_collect, job_stream_batches
from farm.jobs import job_cancel
from farm.metrics import TOKENS, TTFT
from farm.models import JobStatus
from farm.rate_limits import Reservation, rate_limit_reserve, rate_limit_settle
from farm.stream_format import Delta, End, Failure, Restart, StreamEvent
from settings import env

log = logging.getLogger(__name__)

# Statuses a generation request can answer with an OpenAI error body (403, 429: per-key limits).
GENERATION_ERRORS = (400, 401, 403, 404, 413, 429, 500, 503, 504)


class Shaper(Protocol):
    kind: str
    id_prefix: str

    def chunk(self, sub: Submission, *, text: str | None, finish_reason: str | None, first: bool) -> dict[str, Any]: ...

    def body(self, sub: Submission, *, text: str, finish_reason: str) -> dict[str, Any]: ...


def usage(end: End) -> dict[str, int]:
    return {
        "prompt_tokens": end.prompt_tokens,
        "completion_tokens": end.completion_tokens,
        "total_tokens": end.prompt_tokens + end.completion_tokens,
    }


def failure_error(failure: Failure) -> FarmError:
    return FarmError(failure.message, status=failure.status, type=failure.type, code=failure.code)


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class DeltaChunks:
    """A stream's content chunks as SSE bytes. The first carries the role; the rest differ only in their text, so
    that chunk is serialised once around a marker and each token's text is spliced in: ~0.5 us per token instead of
    ~4.3 us to build the chunk's dict and dump it, byte for byte the same."""

    _MARK = "\x00farm-text\x00"

    def __init__(self, shaper: Shaper, sub: Submission, *, include_usage: bool) -> None:
        self.first = True  # nothing sent yet
        self._shaper, self._sub, self._usage = shaper, sub, {"usage": None} if include_usage else {}
        chunk = shaper.chunk(sub, text=self._MARK, finish_reason=None, first=False)
        self._head, self._tail = _sse({**chunk, **self._usage}).split(orjson.dumps(self._MARK))

    def __call__(self, text: str) -> bytes:
        if self.first:
            self.first = False
            return _sse({**self._shaper.chunk(self._sub, text=text, finish_reason=None, first=True), **self._usage})
        return self._head + orjson.dumps(text) + self._tail

    def finish(self, finish_reason: str | None) -> bytes:
        """The chunk that ends the choice (with the role, if nothing was sent before it)."""
        chunk = self._shaper.chunk(self._sub, text=None, finish_reason=finish_reason, first=self.first)
        return _sse({**chunk, **self._usage})


async def _mark_timed_out(sub: Submission) -> None:
    """The API gave up waiting: end the job unless its worker already ended it."""
    await run_db(
        jobs.job_transition,
        job_id=sub.job_id,
        attempt=None,
        to=JobStatus.TIMED_OUT,
        worker_id="api",
        detail={"error": {"code": "deadline_exceeded", "message": "no result before the deadline"}},
    )


_background: set[asyncio.Task] = set()


@dataclass
class _Streamed:
    """Completion tokens sent to the client so far."""

    tokens: int = 0


def _cancel_abandoned(sub: Submission, reservation: Reservation, streamed_tokens: int) -> None:
    """The client went away mid-stream: cancel its job so the engine stops generating for nobody, and give its key
    back the tokens it reserved and will not use."""

    async def cancel() -> None:
        try:
            await run_db(job_cancel, job_id=sub.job_id, owner_id=None, by="client disconnect")
        except FarmError:  # it finished at the same instant: nothing to cancel
            pass
        except Exception:  # the reaper and the deadline still end the job
            log.warning("could not cancel abandoned job %s", sub.job_id, exc_info=True)
        try:
            await rate_limit_settle(reservation, used_tokens=reservation.used_if_abandoned(streamed_tokens))
        except RedisError as exc:  # the reservation stands: the key is charged its estimate
            log.warning("could not settle the reservation of abandoned job %s: %s", sub.job_id, exc)

    task = asyncio.get_running_loop().create_task(cancel())
    _background.add(task)
    task.add_done_callback(_background.discard)


async def _event_stream(
    sub: Submission,
    shaper: Shaper,
    include_usage: bool,
    batches: AsyncIterator[list[StreamEvent]],
    reservation: Reservation,
) -> AsyncIterator[bytes]:
    streamed = _Streamed()
    abandoned = False

    def abandon() -> None:
        nonlocal abandoned
        if not abandoned:
            abandoned = True
            _cancel_abandoned(sub, reservation, streamed.tokens)

    # Two ways to learn that the client left: the ASGI layer's disconnect message (always, at once), and Django
    # cancelling or closing this generator (only when the cancellation lands in it: see `api.disconnects`).
    unregister = on_client_disconnect(abandon)
    try:
        async for chunk in _sse_chunks(sub, shaper, include_usage, batches, reservation, streamed=streamed):
            yield chunk
    except (GeneratorExit, asyncio.CancelledError):  # the client disconnected
        abandon()
        raise
    except (RedisError, DatabaseError) as exc:  # the job goes on; this stream cannot
        log.warning("stream of job %s broken: %s", sub.job_id, exc)
        yield _sse(
            {
                "error": {
                    "message": "The token stream was interrupted; the job's result will be in "
                    f"GET /v1/jobs/{sub.job_id}.",
                    "type": "service_unavailable",
                    "param": None,
                    "code": "stream_interrupted",
                }
            }
        )
        yield DONE
    finally:
        unregister()


_WORKER_LOST = {
    "error": {
        "message": "The worker serving this stream was lost; the job is being retried and its result will be in "
        "GET /v1/jobs/{id}.",
        "type": "server_error",
        "param": None,
        "code": "worker_lost",
    }
}


async def _sse_chunks(
    sub: Submission,
    shaper: Shaper,
    include_usage: bool,
    batches: AsyncIterator[list[StreamEvent]],
    reservation: Reservation,
    *,
    streamed: _Streamed,
) -> AsyncIterator[bytes]:
    """One write per batch of events read together (`job_stream_batches`): under load a read holds many tokens, and
    each ASGI send costs more than its bytes (BENCHMARKS.md, 2026-12-02)."""
    deltas = DeltaChunks(shaper, sub, include_usage=include_usage)
    async for batch in batches:
        parts: list[bytes] = []
        for event in batch:
            if isinstance(event, Restart):
                if deltas.first:  # nothing sent yet: the retry is invisible to the client
                    continue
                yield b"".join([*parts, _sse(_WORKER_LOST), DONE])
                return
            if isinstance(event, Delta):
                streamed.tokens += event.tokens
                parts.append(deltas(event.text))
            elif isinstance(event, End):
                TOKENS.labels(model=sub.model).inc(event.completion_tokens)
                await _settle(reservation, event)
                parts.append(deltas.finish(event.finish_reason))
                if include_usage:
                    parts.append(
                        _sse(
                            {
                                **shaper.chunk(sub, text=None, finish_reason=None, first=False),
                                "choices": [],
                                "usage": usage(event),
                            }
                        )
                    )
            else:
                if event.code == "deadline_exceeded":
                    await _mark_timed_out(sub)
                error = failure_error(event)
                parts.append(
                    _sse({"error": {"message": error.message, "type": error.type, "param": None, "code": error.code}})
                )
        if batch and isinstance(batch[-1], End | Failure):  # the stream's last batch: its end goes in the same write
            yield b"".join([*parts, DONE])
            return
        if parts:
            yield b"".join(parts)
    yield DONE


async def _first_batch(batches: AsyncIterator[list[StreamEvent]]) -> list[StreamEvent]:
    """The first batch that holds more than retries (their `Restart`s dropped: nothing was sent before them)."""
    async for batch in batches:
        events = list(itertools.dropwhile(lambda event: isinstance(event, Restart), batch))
        if events:
            return events
    raise AssertionError("job stream ended without a final event")  # job_stream_batches always ends with one


async def _prepend(head: list[StreamEvent], rest: AsyncIterator[list[StreamEvent]]) -> AsyncIterator[list[StreamEvent]]:
    yield head
    async for batch in rest:
        yield batch


async def _settle(reservation: Reservation, end: End | None) -> None:
    """Corrects the key's TPM bucket and quota to what the job used (None: it produced nothing)."""
    try:
        used = None if end is None else end.prompt_tokens + end.completion_tokens
        await rate_limit_settle(reservation, used_tokens=used)
    except RedisError as exc:  # the reservation stands: the key is charged its estimate
        log.warning("could not settle the rate-limit reservation of key %s: %s", reservation.key_id, exc)


def _max_tokens_param(params: SamplingRequest) -> str | None:
    """The field the client capped its completion with, if any (chat also has `max_completion_tokens`)."""
    if params.max_tokens is not None:
        return "max_tokens"
    return "max_completion_tokens" if getattr(params, "max_completion_tokens", None) is not None else None


async def generation_view(request: HttpRequest, schema: type[SamplingRequest], shaper: Shaper) -> HttpResponse:
    """Key policy (allow-list, max_tokens cap) and rate limits are checked before any job exists; the
    `x-ratelimit-*` headers of the key's limits go on the response, error or not."""
    started = time.perf_counter()
    principal = await authenticate(request)
    params = validate(schema, json_body(request))
    request.farm_model = params.model  # type: ignore[attr-defined]  (metrics label)
    job_request = api_key_check_request(
        policy=principal.policy,
        model=params.model,
        request=params.job_request(),  # type: ignore[attr-defined]
        max_tokens_param=_max_tokens_param(params),
    )
    reservation = await rate_limit_reserve(principal=principal, request=job_request)
    try:
        response = await _generate(
            request,
            params,
            shaper,
            principal=principal,
            job_request=job_request,
            reservation=reservation,
            started=started,
        )
    except FarmError as exc:  # refused or failed: give the reserved tokens back (a 5xx outage keeps them: safe side)
        await _settle(reservation, None)
        exc.headers = {**reservation.headers, **exc.headers}
        raise
    for name, value in reservation.headers.items():
        response[name] = value
    return response


async def _generate(
    request: HttpRequest,
    params: SamplingRequest,
    shaper: Shaper,
    *,
    principal: KeyPrincipal,
    job_request: dict[str, Any],
    reservation: Reservation,
    started: float,
) -> HttpResponse:
    sub = await inference_submit(
        principal=principal,
        kind=shaper.kind,
        model_name=params.model,
        request=job_request,
        timeout_s=min(params.timeout or env.FARM_INFERENCE_TIMEOUT_S, env.FARM_INFERENCE_TIMEOUT_S),
        request_id=getattr(request, "request_id", ""),
    )
    if params.stream:
        # Wait for the first event before answering, so an error that comes before any token (context too long,
        # no capacity, deadline) gets its own HTTP status instead of a 200 with an error event.
        batches = job_stream_batches(sub.job_id, deadline=sub.deadline, after=sub.stream_after)
        head = await _first_batch(batches)
        if isinstance(head[0], Failure):
            if head[0].code == "deadline_exceeded":
                await _mark_timed_out(sub)
            raise failure_error(head[0])
        TTFT.labels(model=sub.model).observe(time.perf_counter() - started)
        return SseResponse(_event_stream(sub, shaper, params.include_usage, _prepend(head, batches), reservation))
    text, final = await job_collect(sub.job_id, deadline=sub.deadline, after=sub.stream_after)
    if isinstance(final, Failure):
        if final.code == "deadline_exceeded":
            await _mark_timed_out(sub)
        raise failure_error(final)
    TOKENS.labels(model=sub.model).inc(final.completion_tokens)
    await _settle(reservation, final)
    return OrjsonResponse({**shaper.body(sub, text=text, finish_reason=final.finish_reason), "usage": usage(final)})
