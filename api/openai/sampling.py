"""Sampling parameters shared by chat and text completions (OpenAI names, OpenAI ranges)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator

MAX_TOKENS_CAP = 1_000_000
# OpenAI's seed is a 64-bit integer; larger ones cannot reach the engine's generator.
SEED_RANGE = (-(2**63), 2**63 - 1)
# JSON Schema of "no NUL character": PostgreSQL cannot store U+0000 in a job's request, and no prompt needs one.
NO_NUL_PATTERN = "^[^\\u0000]*$"


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("NUL characters (\\u0000) are not allowed.")
    return value


# Text the API accepts anywhere in a request: any string without NUL characters.
Text = Annotated[str, AfterValidator(_no_nul), Field(json_schema_extra={"pattern": NO_NUL_PATTERN})]


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() and abs(value) < 2**63 else value


# An integer as JSON Schema means it: `8` or `8.0`, never `"8"` or `8.5` (strict mode otherwise refuses `8.0`).
# Put it after `Field(ge=..., le=...)` in `Annotated[int, ...]`: before them, pydantic documents `ge`/`le` verbatim.
INTEGRAL = BeforeValidator(_integral)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields common to `/v1/chat/completions` and `/v1/completions`. Unknown fields are a 400, like OpenAI."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: Annotated[Text, Field(min_length=1, max_length=200)]
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_CAP), INTEGRAL] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    # Validators below keep OpenAI-style messages; `WithJsonSchema` says the same thing in the OpenAPI document.
    n: Annotated[int | None, INTEGRAL, WithJsonSchema({"anyOf": [{"const": 1}, {"type": "null"}]})] = None
    stop: Annotated[
        str | list[str] | None,
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string", "pattern": NO_NUL_PATTERN},
                    {
                        "type": "array",
                        "maxItems": 4,
                        "items": {"type": "string", "minLength": 1, "pattern": NO_NUL_PATTERN},
                    },
                    {"type": "null"},
                ]
            }
        ),
    ] = None
    seed: Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1]), INTEGRAL] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
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
        for text in [value] if isinstance(value, str) else value or []:
            _no_nul(text)
        return value

    def sampling_payload(self) -> dict[str, Any]:
        """The sampling part of the job's request, as the worker reads it, and whether the client streams (the
        worker then writes the text as it comes, else in one piece: `InferenceMessage.whole_text`)."""
        payload: dict[str, Any] = {"max_tokens": self.max_tokens, "stream": self.stream}
        if self.temperature is not None:
            payload["temperature"] = self.temperature
        if self.top_p is not None:
            payload["top_p"] = self.top_p
        if self.stop:
            payload["stop"] = self.stop
        if self.seed is not None:
            payload["seed"] = self.seed
        if self.presence_penalty:
            payload["presence_penalty"] = self.presence_penalty
        if self.frequency_penalty:
            payload["frequency_penalty"] = self.frequency_penalty
        if self.ignore_eos:
            payload["ignore_eos"] = True
        return payload

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TokenUsage(BaseModel):
    """Token counts of one request, from the model's tokenizer."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
