"""`POST /v1/chat/completions`."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse

from api.errors import openai_endpoint
from api.openai.chat.schema import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest
from api.openai.generation import GENERATION_ERRORS, generation_view
from api.schema import EventStream, Response, operation
from farm.inference import Submission
from farm.models import JobKind


class ChatShaper:
    kind = JobKind.CHAT

    def chunk(self, sub: Submission, *, text: str | None, finish_reason: str | None, first: bool) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        return {
            "id": f"chatcmpl-{sub.job_id}",
            "object": "chat.completion.chunk",
            "created": sub.created,
            "model": sub.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }

    def body(self, sub: Submission, *, text: str, finish_reason: str) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{sub.job_id}",
            "object": "chat.completion",
            "created": sub.created,
            "model": sub.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
        }


_shaper = ChatShaper()


@operation(
    method="POST",
    operation_id="createChatCompletion",
    summary="Create a chat completion",
    tags=("OpenAI",),
    request=ChatCompletionRequest,
    errors=GENERATION_ERRORS,
    responses={
        200: Response(
            "The completion; with `stream: true`, server-sent events of chunks ending with `data: [DONE]`.",
            {"application/json": ChatCompletion, "text/event-stream": EventStream(ChatCompletionChunk)},
        )
    },
)
@openai_endpoint("POST")
async def chat_completions(request: HttpRequest) -> HttpResponse:
    return await generation_view(request, ChatCompletionRequest, _shaper)
