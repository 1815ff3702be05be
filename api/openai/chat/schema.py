"""`POST /v1/chat/completions` request schema."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.openai.sampling import MAX_TOKENS_CAP, SamplingRequest


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=4096)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_CAP)] | None = None
    logprobs: bool | None = None

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
