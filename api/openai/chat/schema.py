"""`POST /v1/chat/completions`: request schema, and the response objects as the OpenAPI document shows them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from api.openai.sampling import INTEGRAL, MAX_TOKENS_CAP, SamplingRequest, Text, TokenUsage


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=4096)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_CAP), INTEGRAL] | None = None
    logprobs: Annotated[bool | None, WithJsonSchema({"anyOf": [{"const": False}, {"type": "null"}]})] = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs are not supported yet.")
        return value

    def job_request(self) -> dict[str, Any]:
        payload = self.sampling_payload()
        if self.max_completion_tokens is not None and self.max_tokens is None:
            payload["max_tokens"] = self.max_completion_tokens
        role_map = {"developer": "system"}
        payload["messages"] = [{"role": role_map.get(m.role, m.role), "content": m.text()} for m in self.messages]
        return payload


# -- responses (documentation: the view builds plain dicts with exactly these fields) ----------------------------------


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    refusal: None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[ChatChoice]
    usage: TokenUsage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: None
    finish_reason: str | None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion; the stream ends with `data: [DONE]`."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[ChunkChoice]
    usage: TokenUsage | None = None
