"""Sampling parameters shared by chat and text completions (OpenAI names, OpenAI ranges)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TOKENS_CAP = 1_000_000


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields common to `/v1/chat/completions` and `/v1/completions`. Unknown fields are a 400, like OpenAI."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: Annotated[str, Field(min_length=1, max_length=200)]
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_CAP)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    # vLLM extension, used by benchmarks for fixed output lengths.
    ignore_eos: bool = False
    # farm extension: this request's deadline in seconds (capped by FARM_INFERENCE_TIMEOUT_S); 504 after it.
    timeout: Annotated[float, Field(gt=0.0, le=86_400.0)] | None = None

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("only n=1 is supported.")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences are allowed.")
        if isinstance(value, list) and any(not s for s in value):
            raise ValueError("stop sequences must not be empty.")
        return value

    def sampling_payload(self) -> dict[str, Any]:
        """The sampling part of the job's request, as the worker reads it."""
        payload: dict[str, Any] = {"max_tokens": self.max_tokens}
        if self.temperature is not None:
            payload["temperature"] = self.temperature
        if self.top_p is not None:
            payload["top_p"] = self.top_p
        if self.stop:
            payload["stop"] = self.stop
        if self.seed is not None:
            payload["seed"] = self.seed
        if self.ignore_eos:
            payload["ignore_eos"] = True
        return payload

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)
