"""`POST /v1/completions` (legacy text completions)."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse

from api.errors import openai_endpoint
from api.openai.completions.schema import CompletionRequest
from api.openai.generation import generation_view
from farm.inference import Submission
from farm.models import JobKind


class CompletionShaper:
    kind = JobKind.COMPLETION

    def chunk(self, sub: Submission, *, text: str | None, finish_reason: str | None, first: bool) -> dict[str, Any]:
        return {"id": f"cmpl-{sub.job_id}", "object": "text_completion", "created": sub.created, "model": sub.model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]}

    def body(self, sub: Submission, *, text: str, finish_reason: str) -> dict[str, Any]:
        return self.chunk(sub, text=text, finish_reason=finish_reason, first=True)


_shaper = CompletionShaper()


@openai_endpoint("POST")
async def completions(request: HttpRequest) -> HttpResponse:
    return await generation_view(request, CompletionRequest, _shaper)
