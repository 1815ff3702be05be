"""`POST /v1/completions`: request schema, and the response object as the OpenAPI document shows it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, WithJsonSchema, field_validator

from api.openai.sampling import INTEGRAL, SamplingRequest, Text, TokenUsage

# OpenAI's default for the legacy completions endpoint (chat defaults to the rest of the context).
DEFAULT_MAX_TOKENS = 16


class CompletionRequest(SamplingRequest):
    prompt: Text | Annotated[list[Text], Field(json_schema_extra={"minItems": 1, "maxItems": 1})]
    # Not supported yet: only their "off" values are accepted (the validator says why).
    echo: Annotated[bool, WithJsonSchema({"const": False, "default": False})] = False
    logprobs: Annotated[int | None, INTEGRAL, WithJsonSchema({"anyOf": [{"const": 0}, {"type": "null"}]})] = None
    suffix: Annotated[str | None, WithJsonSchema({"anyOf": [{"const": ""}, {"type": "null"}]})] = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request is supported.")
        return value

    @field_validator("echo", "suffix", "logprobs")
    @classmethod
    def _unsupported(cls, value: Any) -> Any:
        if value:
            raise ValueError("not supported yet.")
        return value

    def job_request(self) -> dict[str, Any]:
        payload = self.sampling_payload()
        if payload["max_tokens"] is None:
            payload["max_tokens"] = DEFAULT_MAX_TOKENS
        payload["prompt"] = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        return payload


# -- responses (documentation: the view builds plain dicts with exactly these fields) ----------------------------------


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None
    finish_reason: str | None


class Completion(BaseModel):
    """The response body, and (without `usage`, `finish_reason` null until the end) each streamed `data:` event."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[CompletionChoice]
    usage: TokenUsage | None = None
