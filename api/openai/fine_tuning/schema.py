"""Request bodies of `/v1/fine_tuning/jobs` and `/v1/evals/loss` (pydantic: what the views validate)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Auto = Literal["auto"]
# Ids and names: no NUL (PostgreSQL text cannot hold it; such a value can only be a client error).
NO_NUL = r"^[^\x00]+$"
Id = Annotated[str, Field(min_length=1, max_length=64, pattern=NO_NUL)]


class Hyperparameters(BaseModel):
    """OpenAI's three, and the farm's LoRA settings; each a value in its range, `"auto"` or absent (a default).
    The same bounds are checked again by `farm.fine_tuning.hyperparameters_resolve` (services are called by others)."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: Annotated[int, Field(ge=1, le=50)] | Auto | None = None
    batch_size: Annotated[int, Field(ge=1, le=256)] | Auto | None = None
    learning_rate_multiplier: Annotated[float, Field(ge=1e-6, le=100)] | Auto | None = None
    lora_rank: Annotated[int, Field(ge=1, le=64)] | Auto | None = None
    lora_alpha: Annotated[int, Field(ge=1, le=1024)] | Auto | None = None
    lora_dropout: Annotated[float, Field(ge=0, le=0.9)] | Auto | None = None
    max_seq_len: Annotated[int, Field(ge=16, le=32768)] | Auto | None = None
    max_steps: Annotated[int, Field(ge=1, le=1_000_000)] | Auto | None = None


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    """OpenAI's `method`; the farm runs supervised LoRA fine-tuning only."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised"]
    supervised: SupervisedMethod | None = None


class FineTuningJobCreate(BaseModel):
    """OpenAI's create body, plus `depends_on` (farm: job ids that must succeed first). Hyperparameters take OpenAI's
    `n_epochs`, `batch_size`, `learning_rate_multiplier` and the farm's `lora_rank`, `lora_alpha`, `lora_dropout`,
    `max_seq_len`, `max_steps` (each a value or "auto"), checked by `farm.fine_tuning.hyperparameters_resolve`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200, pattern=NO_NUL)
    training_file: Id
    validation_file: Id | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9_-]*$")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] | None = Field(default=None, max_length=0)
    depends_on: list[Id] | None = Field(default=None, max_length=32)


class EvalLossCreate(BaseModel):
    """`POST /v1/evals/loss` (farm): the loss of `model` (a base or `<base>:ft-<id>`) on a `fine-tune` JSONL file."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200, pattern=NO_NUL)
    file: Id
    batch_size: int = Field(default=8, ge=1, le=256)
    max_seq_len: int = Field(default=1024, ge=16, le=32768)
    depends_on: list[Id] | None = Field(default=None, max_length=32)
