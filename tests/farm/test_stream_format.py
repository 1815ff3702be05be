"""The job stream's wire format: every event kind survives encode -> decode, as bytes (Redis) or str."""

from __future__ import annotations

import orjson
import pytest

from farm.stream_format import Delta, End, Failure, Restart, StreamEvent, decode, encode

EVENTS = [
    pytest.param(Delta(text="Hello", tokens=1), id="delta"),
    pytest.param(Delta(text="", tokens=0), id="empty-delta"),
    pytest.param(Delta(text=" \n  leading and trailing space\t ", tokens=4), id="whitespace-delta"),
    pytest.param(Delta(text='héllo wörld, 你好 🌍\n\t"quoted" \\ \u0000', tokens=7), id="unicode-delta"),
    pytest.param(End(finish_reason="length", prompt_tokens=12, completion_tokens=16), id="end"),
    pytest.param(End(finish_reason="stop", prompt_tokens=0, completion_tokens=0), id="empty-end"),
    pytest.param(
        Failure(
            status=400,
            type="invalid_request_error",
            code="context_length_exceeded",
            message="Trop long : 2 048 jetons ≥ 1 024 ✗",
        ),
        id="failure",
    ),
    pytest.param(Failure(status=504, type="timeout_error", code="deadline_exceeded", message=""), id="timeout"),
    pytest.param(Restart(attempt=2), id="restart"),
]


@pytest.mark.parametrize("event", EVENTS)
def test_round_trip(event: StreamEvent) -> None:
    raw = encode(event)
    assert isinstance(raw, bytes)
    assert decode(raw) == event
    assert decode(raw.decode()) == event
    assert type(decode(raw)) is type(event)


@pytest.mark.parametrize("event", EVENTS)
def test_each_entry_is_one_compact_json_object(event: StreamEvent) -> None:
    raw = encode(event)
    assert b"\n" not in raw
    assert isinstance(orjson.loads(raw), dict)
