"""`POST /v1/completions` request schema."""

from __future__ import annotations

from typing import Any

from pydantic import field_validator

from api.openai.sampling import SamplingRequest

# OpenAI's default for the legacy completions endpoint (chat defaults to the rest of the context).
DEFAULT_MAX_TOKENS = 16


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

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
