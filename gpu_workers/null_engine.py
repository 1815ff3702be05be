"""A zero-cost engine behind the same `Engine` interface, for measuring the control plane alone.

It "generates" `max_tokens` one-word tokens without computing anything, one token per event-loop turn (so concurrent
requests interleave as they would across engine steps) or one per "engine step" of FARM_NULL_ENGINE_TOKEN_INTERVAL_S
seconds: every running request gets its token at the same tick, as a continuous-batching engine emits one output per
running request per step (and a worker writes them to Redis together).
Selected only by `FARM_NULL_ENGINE=1` on a worker (`bench/control_plane.py` sets it); never in production, where a
spec always names a real engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from gpu_workers.engine import EngineConfig, EngineOutput, PreparedRequest, SamplingOptions

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16


class NullEngine:
    """Tokens are words of the prompt (for usage counts); output is the word `tok` repeated."""

    max_model_len = 1_000_000

    def __init__(self, config: EngineConfig) -> None:
        from gpu_workers import envs

        self.token_interval_s = envs.FARM_NULL_ENGINE_TOKEN_INTERVAL_S
        log.warning("spec %s served by the NULL engine (FARM_NULL_ENGINE=1): benchmark use only", config.spec_name)

    def prepare(
        self,
        *,
        request_id: str,
        messages: list[dict[str, Any]] | None,
        prompt: str | None,
        sampling: SamplingOptions,
        **_: Any,
    ) -> PreparedRequest:
        text = " ".join(str(m.get("content") or "") for m in messages) if messages is not None else (prompt or "")
        return PreparedRequest(
            request_id=request_id,
            prompt_token_ids=list(range(max(1, len(text.split())))),
            max_tokens=sampling.max_tokens or DEFAULT_MAX_TOKENS,
            sampling=sampling,
        )

    async def generate(self, request: PreparedRequest, **_: Any) -> AsyncIterator[EngineOutput]:
        prompt_tokens = len(request.prompt_token_ids)
        for index in range(request.max_tokens):
            last = index == request.max_tokens - 1
            yield EngineOutput(
                text=" tok", tokens=1, finish_reason="length" if last else None, prompt_tokens=prompt_tokens
            )
            await asyncio.sleep(self._until_next_step())

    def _until_next_step(self) -> float:
        interval = self.token_interval_s
        return interval - time.monotonic() % interval if interval > 0 else 0.0

    async def abort(self, request_id: str) -> None:
        return None

    def shutdown(self) -> None:
        return None
