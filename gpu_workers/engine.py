"""The engine interface the worker drives, and its vLLM implementation.

Only this package imports vLLM. The rest of the farm sees `Engine`: prepare a request (tokenize, check limits) in
the calling thread, then stream `EngineOutput`s from `generate` on the engine's event loop.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


class EngineInputError(ValueError):
    """The request cannot run on this model (too long for the context, bad stop list...): a 400, never retried."""


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False


@dataclass(frozen=True)
class PreparedRequest:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    sampling: SamplingOptions


@dataclass(frozen=True)
class EngineOutput:
    text: str
    tokens: int
    finish_reason: str | None  # set on the last output
    prompt_tokens: int


class Engine(Protocol):
    """What the worker needs from an inference engine."""

    max_model_len: int

    def prepare(
        self, *, request_id: str, messages: list[dict[str, Any]] | None, prompt: str | None, sampling: SamplingOptions
    ) -> PreparedRequest: ...

    def generate(self, request: PreparedRequest) -> AsyncIterator[EngineOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    def shutdown(self) -> None: ...


@dataclass(frozen=True)
class EngineConfig:
    """What to load: weights directory, engine kind and vLLM engine args (from the model spec)."""

    spec_name: str
    model_path: Path
    engine: str = "vllm-cpu"
    engine_args: dict[str, Any] = field(default_factory=dict)


class VllmEngine:
    """One in-process `AsyncLLM`; many worker threads submit to it so vLLM batches them continuously."""

    def __init__(self, config: EngineConfig) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args: dict[str, Any] = {"max_model_len": 2048, "disable_log_stats": True}
        args.update(config.engine_args)
        started = time.monotonic()
        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(config.model_path), **args))
        self._tokenizer = self._llm.get_tokenizer()
        self.max_model_len: int = self._llm.model_config.max_model_len
        log.info("engine for %s loaded in %.1fs (max_model_len=%d)", config.spec_name, time.monotonic() - started,
                 self.max_model_len)

    def prepare(
        self, *, request_id: str, messages: list[dict[str, Any]] | None, prompt: str | None, sampling: SamplingOptions
    ) -> PreparedRequest:
        if messages is not None:
            # Render then encode (as vLLM's server does): the template already carries the special tokens.
            text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            token_ids = self._tokenizer.encode(text, add_special_tokens=False)
        else:
            token_ids = self._tokenizer.encode(prompt or "")
        token_ids = list(token_ids)
        room = self.max_model_len - len(token_ids)
        if room <= 0 or (sampling.max_tokens is not None and sampling.max_tokens > room):
            asked = sampling.max_tokens or 1
            raise EngineInputError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(token_ids) + asked} tokens ({len(token_ids)} in the messages, {asked} in the completion)."
            )
        return PreparedRequest(
            request_id=request_id,
            prompt_token_ids=token_ids,
            max_tokens=sampling.max_tokens if sampling.max_tokens is not None else room,
            sampling=sampling,
        )

    async def generate(self, request: PreparedRequest) -> AsyncIterator[EngineOutput]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        options = request.sampling
        params = SamplingParams(
            n=1,
            max_tokens=request.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            stop=options.stop or None,
            seed=options.seed,
            ignore_eos=options.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
        )
        prompt_tokens = len(request.prompt_token_ids)
        stream = self._llm.generate(
            TokensPrompt(prompt_token_ids=request.prompt_token_ids), params, request.request_id
        )
        async for output in stream:
            completion = output.outputs[0]
            yield EngineOutput(
                text=completion.text,
                tokens=len(completion.token_ids),
                finish_reason=completion.finish_reason if output.finished else None,
                prompt_tokens=prompt_tokens,
            )

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    def shutdown(self) -> None:
        self._llm.shutdown()


def create_engine(config: EngineConfig) -> Engine:
    """Builds the engine a spec asks for. CPU engines get a bounded KV cache unless the operator set one."""
    if config.engine == "vllm-cpu":
        from gpu_workers import envs

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", envs.FARM_CPU_KVCACHE_GIB)
    if config.engine in ("vllm", "vllm-cpu"):
        return VllmEngine(config)
    raise ValueError(f"unknown engine {config.engine!r} for spec {config.spec_name}")
