"""schemathesis hooks for `test_fuzz.py` (loaded by `st run` through SCHEMATHESIS_HOOKS).

They keep a CI run short without switching any check off:
- `model` in the generation requests is narrowed to the served tiny model or an unknown name (the model nobody
  serves answers 503 by design, see `test_errors.py`), so generated requests reach the engine instead of all being
  404s;
- in schema-valid (positive) cases only, a generation request asks for at most 8 tokens (`max_tokens` is set when
  absent or larger), a client deadline (`timeout`) is at least 60 s and there are at most 8 messages: the case stays
  schema-valid, and the engine run stays short and within the tiny model's 1024-token context (a prompt plus
  `max_tokens` over the context is a 400 that no JSON Schema can express; `test_errors.py` covers it, the default
  `max_tokens` and a short deadline's 504 too).
- `GET /v1/usage` spans at most 366 days and never ends before it starts, a rule between two parameters that JSON
  Schema cannot state: a schema-valid case whose `start_date` breaks it drops `start_date` (the default applies).
Invalid (negative) cases are sent exactly as generated.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import schemathesis
from schemathesis import GenerationMode

FUZZ_MODEL = os.environ.get("FARM_FUZZ_MODEL", "tiny-llama")
MAX_TOKENS = 8
MIN_TIMEOUT_S = 60
MAX_MESSAGES = 8


def narrow_models(document: dict[str, Any]) -> None:
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        document["components"]["schemas"][name]["properties"]["model"] = {
            "type": "string",
            "enum": [FUZZ_MODEL, "no-such-model"],
        }


def bound_positive_body(body: dict[str, Any]) -> None:
    if "model" not in body or not {"messages", "prompt"} & body.keys():  # not a generation request
        return
    for field in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(field), int | float) and body[field] > MAX_TOKENS:
            body[field] = MAX_TOKENS
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_TOKENS
    if isinstance(body.get("timeout"), int | float) and body["timeout"] < MIN_TIMEOUT_S:
        body["timeout"] = MIN_TIMEOUT_S
    if isinstance(body.get("messages"), list):
        del body["messages"][MAX_MESSAGES:]


@schemathesis.hook
def before_load_schema(context: schemathesis.HookContext, raw_schema: dict[str, Any]) -> None:
    narrow_models(raw_schema)


def bound_usage_range(query: dict[str, Any]) -> None:
    try:
        end = datetime.date.fromisoformat(query["end_date"]) if query.get("end_date") else datetime.date.today()
        start = datetime.date.fromisoformat(query["start_date"]) if query.get("start_date") else None
    except (ValueError, TypeError):
        return
    if start is not None and not 0 <= (end - start).days <= 365:
        del query["start_date"]


@schemathesis.hook
def map_case(context: schemathesis.HookContext, case: schemathesis.Case) -> schemathesis.Case:
    if case.meta is None or case.meta.generation.mode != GenerationMode.POSITIVE:
        return case
    if isinstance(case.body, dict):
        bound_positive_body(case.body)
    if case.operation.path == "/v1/usage" and isinstance(case.query, dict):
        bound_usage_range(case.query)
    return case
