"""One batch line's `body` checked against the same request schema as its endpoint, and turned into the job request
the worker reads: a batch line is exactly the request it would be if sent to `url` directly."""

from __future__ import annotations

from typing import Any

from api.body import validate
from api.openai.chat.schema import ChatCompletionRequest
from api.openai.completions.schema import CompletionRequest
from api.openai.sampling import SamplingRequest
from farm.errors import InvalidRequest
from farm.inference import Submission
from farm.models import JobKind

SCHEMAS: dict[str, tuple[type[SamplingRequest], str]] = {
    "/v1/chat/completions": (ChatCompletionRequest, JobKind.CHAT),
    "/v1/completions": (CompletionRequest, JobKind.COMPLETION),
}


def batch_line_job(url: str, body: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """(job kind, model name, job request) of one line; ValueError with the API's message when the body is invalid."""
    schema, kind = SCHEMAS[url]
    try:
        params = validate(schema, body)
    except InvalidRequest as exc:
        raise ValueError(exc.message) from None
    if params.stream:
        raise ValueError("`stream` is not supported in a batch.")
    return kind, params.model, params.job_request()  # type: ignore[attr-defined]


def batch_body_check(url: str, body: dict[str, Any]) -> dict[str, Any]:
    """`farm.files.BodyCheck` for batch uploads."""
    return batch_line_job(url, body)[2]


def batch_response_body(kind: str, sub: Submission, text: str, finish_reason: str) -> dict[str, Any]:
    """`farm.batches.BodyShaper`: the response body the endpoint itself would have answered (without usage)."""
    from api.openai.chat.views import ChatShaper
    from api.openai.completions.views import CompletionShaper

    shaper = ChatShaper() if kind == JobKind.CHAT else CompletionShaper()
    return shaper.body(sub, text=text, finish_reason=finish_reason)
