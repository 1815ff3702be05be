"""Wire format of a job's Redis stream, shared by the worker (writer) and the API (reader). Import-light.

Each entry has one field `m` holding compact JSON:
- `{"t": "d", "x": "<text delta>", "n": <tokens in delta>}`: generated text;
- `{"t": "e", "f": "<finish_reason>", "u": [<prompt tokens>, <completion tokens>]}`: the end;
- `{"t": "x", "s": <http status>, "y": "<error type>", "c": "<code>", "m": "<message>"}`: a failure;
- `{"t": "r", "a": <attempt>}`: an attempt begins: readers drop what they collected of earlier attempts. Attempt 1's
  is the stream's first entry, written when the job is accepted (`farm.job_streams.job_streams_open`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

FIELD = "m"


@dataclass(frozen=True)
class Delta:
    text: str
    tokens: int


@dataclass(frozen=True)
class End:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failure:
    status: int
    type: str
    code: str
    message: str


@dataclass(frozen=True)
class Restart:
    attempt: int


StreamEvent = Delta | End | Failure | Restart


def encode(event: StreamEvent) -> bytes:
    if isinstance(event, Delta):
        obj: dict[str, Any] = {"t": "d", "x": event.text, "n": event.tokens}
    elif isinstance(event, End):
        obj = {"t": "e", "f": event.finish_reason, "u": [event.prompt_tokens, event.completion_tokens]}
    elif isinstance(event, Restart):
        obj = {"t": "r", "a": event.attempt}
    else:
        obj = {"t": "x", "s": event.status, "y": event.type, "c": event.code, "m": event.message}
    return orjson.dumps(obj)


def decode(raw: bytes | str) -> StreamEvent:
    obj = orjson.loads(raw)
    kind = obj["t"]
    if kind == "d":
        return Delta(text=obj["x"], tokens=obj["n"])
    if kind == "e":
        prompt, completion = obj["u"]
        return End(finish_reason=obj["f"], prompt_tokens=prompt, completion_tokens=completion)
    if kind == "r":
        return Restart(attempt=obj["a"])
    return Failure(status=obj["s"], type=obj["y"], code=obj["c"], message=obj["m"])
