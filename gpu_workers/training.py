"""The training runner's child program: LoRA fine-tuning and eval-loss with `transformers` + `peft`.

    python -m gpu_workers.training SPEC.json

Runs in its own process (and process group), started by `gpu_workers.training_runner`, so a cancel or a time limit
kills it hard (SIGKILL of the group) and a crash never takes the worker down. It reads one JSON spec (what to train
on, hyperparameters, where to write), prints one JSON object per line on stdout (`progress`, `checkpoint`,
`result`), and writes the adapter (`adapter_model.safetensors` + `adapter_config.json`, the layout vLLM loads) into
the output directory. Nothing here talks to Redis, the API or a database.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100
# Modules LoRA adapts by default: every linear layer of a Llama-style block (vLLM serves adapters on all of them).
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# `learning_rate_multiplier` scales this (OpenAI's convention: the multiplier is what clients set).
BASE_LEARNING_RATE = 2e-4


@dataclass(frozen=True)
class TrainingSpec:
    """What the child runs. `mode` is `fine_tune` or `eval_loss`; paths are local to the worker."""

    mode: str
    base_model_path: str
    data_path: str
    output_dir: str
    validation_path: str | None = None
    init_adapter_path: str | None = None  # second-stage fine-tune, or eval of a fine-tuned model
    n_epochs: int = 1
    batch_size: int = 4
    learning_rate_multiplier: float = 1.0
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    max_seq_len: int = 1024
    max_steps: int | None = None
    seed: int = 0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainingSpec:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def emit(kind: str, **data: Any) -> None:
    """One line of JSON on stdout: the parent turns it into a job event."""
    sys.stdout.write(json.dumps({"type": kind, **data}) + "\n")
    sys.stdout.flush()


def read_jsonl(path: str) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                try:
                    yield json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"line {number}: not valid JSON ({exc})") from None


def encode_chat(tokenizer: Any, messages: list[dict[str, Any]], max_seq_len: int) -> Example:
    """Token ids of the rendered conversation; labels only on assistant turns (the rest is context, not target).

    Each assistant span is found by rendering the conversation up to that turn: the chat template is
    prefix-stable, so the span is the tokens between "prompt for turn i" and "conversation through turn i"."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    input_ids = list(tokenizer.encode(full, add_special_tokens=False))
    labels = [IGNORE_INDEX] * len(input_ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        start = len(tokenizer.encode(prompt, add_special_tokens=False)) if prompt else 0
        end = len(tokenizer.encode(through, add_special_tokens=False))
        for position in range(start, min(end, len(input_ids))):
            labels[position] = input_ids[position]
    return Example(input_ids=input_ids[:max_seq_len], labels=labels[:max_seq_len])


def load_examples(tokenizer: Any, path: str, max_seq_len: int) -> list[Example]:
    examples = []
    for number, record in enumerate(read_jsonl(path), start=1):
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError(f'line {number}: expected {{"messages": [...]}}')
        example = encode_chat(tokenizer, messages, max_seq_len)
        if example.trained_tokens:
            examples.append(example)
    if not examples:
        raise ValueError("no example has an assistant token to learn from (after truncation)")
    return examples


def collate(batch: list[Example], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(example.input_ids) for example in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(spec: TrainingSpec, *, trainable: bool) -> tuple[Any, Any]:
    """The base model (float32 on CPU, bfloat16 on GPU) wrapped in a LoRA adapter: a new one, or `init_adapter_path`."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = _device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_path)
    base = AutoModelForCausalLM.from_pretrained(spec.base_model_path, dtype=dtype).to(device)
    if spec.init_adapter_path:
        model = PeftModel.from_pretrained(base, spec.init_adapter_path, is_trainable=trainable)
    elif trainable:
        config = LoraConfig(
            r=spec.lora_rank,
            lora_alpha=spec.lora_alpha,
            lora_dropout=spec.lora_dropout,
            target_modules=list(spec.target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, config)
    else:
        model = base
    return tokenizer, model


def mean_loss(model: Any, examples: list[Example], batch_size: int, pad_id: int) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over the assistant tokens, and the number of tokens it covers."""
    import torch

    device = next(model.parameters()).device
    total = 0.0
    tokens = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            inputs = {k: v.to(device) for k, v in collate(batch, pad_id).items()}
            count = sum(example.trained_tokens for example in batch)
            loss = model(**inputs).loss
            total += float(loss) * count
            tokens += count
    return total / max(tokens, 1), tokens


def fine_tune(spec: TrainingSpec) -> dict[str, Any]:
    import torch

    random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    tokenizer, model = load_model(spec, trainable=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    examples = load_examples(tokenizer, spec.data_path, spec.max_seq_len)
    validation = load_examples(tokenizer, spec.validation_path, spec.max_seq_len) if spec.validation_path else None
    steps_per_epoch = math.ceil(len(examples) / spec.batch_size)
    total_steps = steps_per_epoch * spec.n_epochs
    if spec.max_steps:
        total_steps = min(total_steps, spec.max_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=BASE_LEARNING_RATE * spec.learning_rate_multiplier)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / max(total_steps, 1))
    device = next(model.parameters()).device
    emit(
        "started",
        total_steps=total_steps,
        examples=len(examples),
        trainable_parameters=sum(p.numel() for p in trainable),
    )
    step = 0
    trained_tokens = 0
    started = time.monotonic()
    last_loss = float("nan")
    output = Path(spec.output_dir)
    for epoch in range(1, spec.n_epochs + 1):
        order = list(range(len(examples)))
        random.shuffle(order)
        model.train()
        for start in range(0, len(order), spec.batch_size):
            if step >= total_steps:
                break
            batch = [examples[i] for i in order[start : start + spec.batch_size]]
            inputs = {k: v.to(device) for k, v in collate(batch, pad_id).items()}
            loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            trained_tokens += sum(example.trained_tokens for example in batch)
            last_loss = float(loss.detach())
            elapsed = time.monotonic() - started
            emit(
                "progress",
                step=step,
                total_steps=total_steps,
                epoch=epoch,
                train_loss=round(last_loss, 6),
                trained_tokens=trained_tokens,
                elapsed_s=round(elapsed, 3),
                eta_s=round(elapsed / step * (total_steps - step), 3),
            )
        metrics: dict[str, Any] = {"step": step, "train_loss": round(last_loss, 6)}
        if validation is not None:
            metrics["valid_loss"] = round(mean_loss(model, validation, spec.batch_size, pad_id)[0], 6)
        emit("checkpoint", epoch=epoch, metrics=metrics)
        if step >= total_steps:
            break
    model.save_pretrained(str(output / "adapter"))
    return {
        "steps": step,
        "trained_tokens": trained_tokens,
        "train_loss": round(last_loss, 6),
        "seconds": round(time.monotonic() - started, 3),
        "adapter_dir": str(output / "adapter"),
    }


def eval_loss(spec: TrainingSpec) -> dict[str, Any]:
    tokenizer, model = load_model(spec, trainable=False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    examples = load_examples(tokenizer, spec.data_path, spec.max_seq_len)
    started = time.monotonic()
    loss, tokens = mean_loss(model, examples, spec.batch_size, pad_id)
    return {
        "loss": round(loss, 6),
        "perplexity": round(math.exp(min(loss, 50.0)), 4),
        "tokens": tokens,
        "examples": len(examples),
        "seconds": round(time.monotonic() - started, 3),
    }


def die_with_parent() -> None:
    """Linux: the kernel SIGKILLs this process when the worker thread that started it dies, even by SIGKILL, so a
    killed worker leaves no training behind (elsewhere a dead parent surfaces as a broken stdout pipe)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import os
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the line above
        os._exit(1)


def main(argv: list[str]) -> int:
    die_with_parent()
    spec = TrainingSpec.from_json(json.loads(Path(argv[0]).read_text()))
    try:
        result = fine_tune(spec) if spec.mode == "fine_tune" else eval_loss(spec)
    except ValueError as exc:  # bad data: the job fails for good, with a message the client can act on
        emit("error", code="invalid_training_data", message=str(exc))
        return 2
    emit("result", **result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
