"""`POST /v1/completions` (legacy text completions)."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse

from api.errors import openai_endpoint
from api.openai.completions.schema import Completion, CompletionRequest
from api.openai.generation import GENERATION_ERRORS, generation_view
from api.schema import EventStream, Response, operation
from farm.inference import Submission
from farm.models import JobKind


class CompletionShaper:
    kind = JobKind.COMPLETION

    def chunk(self, sub: Submission, *, text: str | None, finish_reason: str | None, first: bool) -> dict[str, Any]:
        return {
            "id": f"cmpl-{sub.job_id}",
            "object": "text_completion",
            "created": sub.created,
            "model": sub.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}],
        }

    def body(self, sub: Submission, *, text: str, finish_reason: str) -> dict[str, Any]:
        return self.chunk(sub, text=text, finish_reason=finish_reason, first=True)


_shaper = CompletionShaper()


@operation(
    method="POST",
    operation_id="createCompletion",
    summary="Create a text completion (legacy)",
    tags=("OpenAI",),
    request=CompletionRequest,
    errors=GENERATION_ERRORS,
    responses={
        200: Response(
            "The completion; with `stream: true`, server-sent events of completion chunks ending with `data: [DONE]`.",
            {"application/json": Completion, "text/event-stream": EventStream(Completion)},
        )
    },
)
@openai_endpoint("POST")
async def completions(request: HttpRequest) -> HttpResponse:
    return await generation_view(request, CompletionRequest, _shaper)
