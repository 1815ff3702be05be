"""Load generation (closed loop, or Poisson arrivals) and the per-request sample, shared by every arm of
`bench.throughput`.

Import-light on purpose: the direct-engine arm (`bench.direct_arm`) imports it next to vLLM, the HTTP arms next to
aiohttp.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Sample:
    """One request as the client saw it. Times are seconds from the moment the request was sent."""

    ttft_s: float | None  # first non-empty content delta
    latency_s: float  # last byte / last engine output
    output_tokens: int
    prompt_tokens: int
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Batch:
    """A closed-loop run: `concurrency` clients, each sending its next prompt as soon as its last one ended."""

    concurrency: int
    elapsed_s: float  # first send -> last response end
    samples: list[Sample]

    def as_dict(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "elapsed_s": self.elapsed_s,
            "samples": [s.as_dict() for s in self.samples],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Batch:
        return cls(
            concurrency=data["concurrency"], elapsed_s=data["elapsed_s"], samples=[Sample(**s) for s in data["samples"]]
        )


def poisson_arrivals(count: int, rate: float, rng: random.Random) -> list[float]:
    """`count` send times (seconds from the start) of a Poisson process of `rate` requests/s: exponential gaps, as
    vLLM's `benchmark_serving --request-rate` (burstiness 1) draws them."""
    times, now = [], 0.0
    for _ in range(count):
        times.append(now)
        now += rng.expovariate(rate)
    return times


async def closed_loop(
    prompts: Sequence[str],
    concurrency: int,
    send: Callable[[str], Awaitable[Sample]],
    arrivals: Sequence[float] | None = None,
) -> Batch:
    """Runs every prompt through `send` with at most `concurrency` in flight; exceptions become failed samples.
    With `arrivals` (seconds from the start, one per prompt) the load is open: prompt i is sent at arrivals[i], or
    as soon as fewer than `concurrency` are in flight after that (vLLM's `--max-concurrency`); TTFT and latency
    count from the send."""
    if arrivals is not None:
        return await _open_loop(prompts, arrivals, concurrency, send)
    next_index = 0
    samples: list[Sample] = []

    async def client() -> None:
        nonlocal next_index
        while next_index < len(prompts):
            prompt = prompts[next_index]
            next_index += 1
            started = time.perf_counter()
            try:
                samples.append(await send(prompt))
            except Exception as exc:  # a failed request is a result to report, not a crash of the bench
                samples.append(
                    Sample(
                        ttft_s=None,
                        latency_s=time.perf_counter() - started,
                        output_tokens=0,
                        prompt_tokens=0,
                        error=f"{exc.__class__.__name__}: {exc}"[:300],
                    )
                )

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(min(concurrency, len(prompts)))))
    return Batch(concurrency=concurrency, elapsed_s=time.perf_counter() - started, samples=samples)


async def _open_loop(
    prompts: Sequence[str], arrivals: Sequence[float], concurrency: int, send: Callable[[str], Awaitable[Sample]]
) -> Batch:
    slots = asyncio.Semaphore(concurrency)
    samples: list[Sample] = []
    started = time.perf_counter()

    async def one(prompt: str, at: float) -> None:
        delay = at - (time.perf_counter() - started)
        if delay > 0:
            await asyncio.sleep(delay)
        async with slots:
            sent = time.perf_counter()
            try:
                samples.append(await send(prompt))
            except Exception as exc:
                samples.append(
                    Sample(
                        ttft_s=None,
                        latency_s=time.perf_counter() - sent,
                        output_tokens=0,
                        prompt_tokens=0,
                        error=f"{exc.__class__.__name__}: {exc}"[:300],
                    )
                )

    await asyncio.gather(*(one(prompt, at) for prompt, at in zip(prompts, arrivals, strict=True)))
    return Batch(concurrency=concurrency, elapsed_s=time.perf_counter() - started, samples=samples)
