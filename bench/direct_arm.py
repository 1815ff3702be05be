"""The ceiling arm of `bench.throughput`: closed-loop load straight into one in-process vLLM `AsyncLLM`.

    python -m bench.direct_arm --model-dir DIR [--engine-args JSON]

Run by `bench.throughput` as a child process, so the engine's memory goes away with it. It loads the engine the way
the farm's worker does (`gpu_workers.engine.VllmEngine`: the same defaults under the spec's engine args, the same
chat-template rendering and encoding), then answers commands, one JSON object per line on stdin:

    {"op": "run", "prompts": [...], "concurrency": 16, "max_tokens": 64, "temperature": 1.0, "arrivals": null}
    {"op": "quit"}

and writes one JSON object per line to stdout: `{"event": "ready", ...}` once, then one `{"event": "batch", ...}`
(a `bench.loadgen.Batch`) per run. Everything vLLM logs goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import time
from typing import Any, TextIO

from bench.loadgen import Sample, closed_loop

# The farm's worker defaults (gpu_workers/engine.py, VllmEngine); the spec's engine args override them.
FARM_ENGINE_DEFAULTS: dict[str, Any] = {"max_model_len": 2048, "disable_log_stats": True}


def emit(out: TextIO, payload: dict[str, Any]) -> None:
    out.write(json.dumps(payload) + "\n")
    out.flush()


async def serve(args: argparse.Namespace, out: TextIO) -> None:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    started = time.monotonic()
    engine_args = {**FARM_ENGINE_DEFAULTS, **json.loads(args.engine_args)}
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(model=args.model_dir, **engine_args))
    tokenizer = llm.get_tokenizer()
    emit(out, {"event": "ready", "load_s": time.monotonic() - started, "pid": os.getpid()})
    ids = itertools.count()
    loop = asyncio.get_running_loop()

    async def one(prompt: str, params: SamplingParams) -> Sample:
        sent = time.perf_counter()
        # As the farm's worker and vLLM's server do: render the chat template, then encode without extra specials.
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        token_ids = list(tokenizer.encode(text, add_special_tokens=False))
        ttft = None
        tokens = 0
        async for output in llm.generate(TokensPrompt(prompt_token_ids=token_ids), params, f"direct-{next(ids)}"):
            new = len(output.outputs[0].token_ids)
            if ttft is None and output.outputs[0].text:
                ttft = time.perf_counter() - sent
            tokens += new
        return Sample(
            ttft_s=ttft, latency_s=time.perf_counter() - sent, output_tokens=tokens, prompt_tokens=len(token_ids)
        )

    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            command = json.loads(line)
            if command["op"] == "quit":
                return
            params = SamplingParams(
                n=1,
                max_tokens=command["max_tokens"],
                temperature=command["temperature"],
                top_p=1.0,
                ignore_eos=True,
                output_kind=RequestOutputKind.DELTA,
            )
            batch = await closed_loop(
                command["prompts"],
                command["concurrency"],
                lambda prompt, params=params: one(prompt, params),
                command.get("arrivals"),
            )
            emit(out, {"event": "batch", **batch.as_dict()})
    finally:
        llm.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.direct_arm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--engine-args", default="{}", help="JSON object of vLLM engine args (the spec's)")
    args = parser.parse_args(argv)
    # Results own the real stdout; fd 1 (inherited by vLLM's engine-core process too) becomes stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    try:
        import uvloop  # what vLLM's own server runs on: the ceiling should not pay for the stock loop

        uvloop.run(serve(args, out))
    except ImportError:
        asyncio.run(serve(args, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
