"""Runs one inference job on this worker: claim it, drive the engine, stream tokens, report the outcome."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from farm.stream_format import Delta, End, Failure, Restart
from gpu_workers.engine import Engine, EngineInputError, PreparedRequest, SamplingOptions
from gpu_workers.stream_writer import StreamWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceMessage:
    """The task's JSON payload, as published by `farm.inference.inference_submit`."""

    job_id: str
    attempt: int
    spec: str
    kind: str
    request: dict[str, Any]
    deadline: float  # epoch seconds
    adapter: dict[str, Any] | None = None  # fine-tuned model: {name, lora_id, token} (farm.dispatch)
    stream_tokens: bool = True  # False: nobody reads the tokens live (batch lines); only the outcome is written

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> InferenceMessage:
        return cls(**{name: kwargs[name] for name in cls.__dataclass_fields__ if name in kwargs})

    @property
    def whole_text(self) -> bool:
        """The client waits for the whole answer (`stream: false`): its text goes out in one delta at the end,
        not one Redis write (and one API wake-up) per engine step."""
        return self.stream_tokens and self.request.get("stream") is False


@dataclass(frozen=True)
class Outcome:
    status: str  # succeeded | failed | timed_out | canceled | requeue (handed back) | skipped (nothing ran)
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: dict[str, Any] | None = None

    def event_detail(self) -> dict[str, Any]:
        detail: dict[str, Any] = {}
        if self.status == "succeeded":
            detail["result"] = {"text": self.text, "finish_reason": self.finish_reason}
        detail["usage"] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        if self.error:
            detail["error"] = self.error
        return detail


def outcome_log(message: InferenceMessage, outcome: Outcome) -> None:
    """The one INFO line per job attempt, at its end (a second one per job was ~2.5 % of a busy worker's CPU)."""
    log.info(
        "job %s attempt %d %s (%d prompt + %d completion tokens)",
        message.job_id,
        message.attempt,
        outcome.status,
        outcome.prompt_tokens,
        outcome.completion_tokens,
    )


def sampling_from_request(request: dict[str, Any]) -> SamplingOptions:
    stop = request.get("stop")
    return SamplingOptions(
        max_tokens=request.get("max_tokens"),
        temperature=request.get("temperature", 1.0),
        top_p=request.get("top_p", 1.0),
        stop=[stop] if isinstance(stop, str) else list(stop or []),
        seed=request.get("seed"),
        ignore_eos=bool(request.get("ignore_eos", False)),
        presence_penalty=request.get("presence_penalty", 0.0),
        frequency_penalty=request.get("frequency_penalty", 0.0),
    )


def prepare(engine: Engine, message: InferenceMessage) -> PreparedRequest:
    """Tokenizes in the calling (task) thread, so the engine loop only schedules."""
    request = message.request
    return engine.prepare(
        request_id=f"{message.job_id}-{message.attempt}",
        messages=request.get("messages"),
        prompt=request.get("prompt"),
        sampling=sampling_from_request(request),
        stream=message.stream_tokens,
    )


async def write_failure(writer: StreamWriter, job_id: str, failure: Failure) -> None:
    """Ends the job's stream with `failure`, through the engine loop's writer: a burst of them (a backlog whose
    deadlines passed together) goes out in a few pipelines on one connection, not one connection each."""
    writer.append(job_id, failure, final=True)
    await writer.flushed()


@dataclass
class TokenCount:
    """Tokens of an attempt so far, readable from another thread while it runs (a canceled attempt's usage)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


async def stream_generation(
    *,
    writer: StreamWriter,
    engine: Engine,
    job_id: str,
    attempt: int,
    prepared: PreparedRequest,
    deadline: float,
    counted: TokenCount | None = None,
    whole_text: bool = False,
) -> Outcome:
    """Streams the engine's deltas into the job's Redis stream; aborts the engine request at the deadline.

    With `whole_text` the text is written as one delta just before the end. The engine still streams, so the
    tokens of an attempt that is stopped midway are counted exactly."""
    if attempt > 1:  # readers drop what an earlier attempt streamed
        writer.append(job_id, Restart(attempt))
    parts: list[str] = []
    completion_tokens = 0
    finish_reason = "stop"
    prompt_tokens = len(prepared.prompt_token_ids)
    counted = counted or TokenCount()
    counted.prompt_tokens = prompt_tokens
    whole = prepared.stream and whole_text  # one delta at the end
    live = prepared.stream and not whole_text  # a delta per engine step
    try:
        async with asyncio.timeout(max(0.0, deadline - time.time())):
            async for output in engine.generate(prepared):
                completion_tokens += output.tokens
                counted.completion_tokens = completion_tokens
                if output.text or output.tokens:
                    parts.append(output.text)
                    if live:
                        writer.append(job_id, Delta(output.text, output.tokens))
                if output.finish_reason:
                    finish_reason = output.finish_reason
    except TimeoutError:  # leaving the generator aborts the vLLM request and frees its KV cache
        message = "The request did not finish before its deadline."
        await write_failure(writer, job_id, Failure(504, "timeout_error", "deadline_exceeded", message))
        return Outcome(
            status="timed_out",
            text="".join(parts),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            error={"code": "deadline_exceeded", "message": message},
        )
    if whole and parts:
        writer.append(job_id, Delta("".join(parts), completion_tokens))
    end = End(finish_reason=finish_reason, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
    writer.append(job_id, end, final=True)
    await writer.flushed()
    return Outcome(
        status="succeeded",
        text="".join(parts),
        finish_reason=finish_reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
    )


def input_error_outcome(exc: EngineInputError) -> tuple[Failure, Outcome]:
    failure = Failure(400, "invalid_request_error", exc.code, str(exc))
    return failure, Outcome(status="failed", error={"code": failure.code, "message": failure.message, "retry": False})
