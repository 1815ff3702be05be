"""The training child (`gpu_workers.training`) on the tiny model: loss only on assistant tokens, a LoRA fine-tune that
lowers the loss and writes a PEFT adapter, and eval-loss with and without it. In-process (the runner's child-process
handling is covered live in tests/api/test_fine_tuning.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpu_workers.training import IGNORE_INDEX, TrainingSpec, encode_chat, eval_loss, fine_tune

CONVERSATION = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "The answer is 5."},
    {"role": "user", "content": "And 4 plus 4?"},
    {"role": "assistant", "content": "It is 8."},
]


def write_data(path: Path, count: int = 12) -> Path:
    lines = []
    for i in range(count):
        lines.append(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"What is {i} plus {i}?"},
                        {"role": "assistant", "content": f"The answer is {2 * i}."},
                    ]
                }
            )
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def test_only_assistant_turns_are_learned(tiny_tokenizer) -> None:
    example = encode_chat(tiny_tokenizer, CONVERSATION, max_seq_len=1024)
    assert len(example.input_ids) == len(example.labels)
    learned = [token for token, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    text = tiny_tokenizer.decode(learned)
    assert "The answer is 5." in text and "It is 8." in text
    assert "What is" not in text and "You add numbers" not in text
    truncated = encode_chat(tiny_tokenizer, CONVERSATION, max_seq_len=8)
    assert len(truncated.input_ids) == 8


def spec(tmp_path: Path, model_dir: Path, **overrides) -> TrainingSpec:
    data = write_data(tmp_path / "data.jsonl")
    values = {
        "mode": "fine_tune",
        "base_model_path": str(model_dir),
        "data_path": str(data),
        "output_dir": str(tmp_path / "out"),
        "n_epochs": 3,
        "batch_size": 4,
        "learning_rate_multiplier": 10,
        **overrides,
    }
    return TrainingSpec.from_json(values)


def test_fine_tune_lowers_the_loss_and_writes_a_peft_adapter(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    result = fine_tune(spec(tmp_path, tiny_model_dir))
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    progress = [line for line in lines if line["type"] == "progress"]
    assert [p["step"] for p in progress] == list(range(1, 10))  # 12 examples / 4 x 3 epochs
    assert progress[-1]["train_loss"] < progress[0]["train_loss"]
    assert [line["epoch"] for line in lines if line["type"] == "checkpoint"] == [1, 2, 3]
    adapter = Path(result["adapter_dir"])
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
    assert result["steps"] == 9 and result["trained_tokens"] > 0

    base = eval_loss(spec(tmp_path, tiny_model_dir, mode="eval_loss"))
    tuned = eval_loss(spec(tmp_path, tiny_model_dir, mode="eval_loss", init_adapter_path=str(adapter)))
    assert tuned["tokens"] == base["tokens"] > 0
    assert tuned["loss"] < base["loss"]


def test_max_steps_caps_the_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    assert fine_tune(spec(tmp_path, tiny_model_dir, max_steps=2))["steps"] == 2


def test_data_without_assistant_turns_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match="no example"):
        fine_tune(spec(tmp_path, tiny_model_dir, data_path=str(data)))


@pytest.mark.gpu
def test_fine_tune_on_a_gpu_in_bfloat16(tmp_path: Path, tiny_model_dir: Path) -> None:
    import torch

    assert torch.cuda.is_available()
    result = fine_tune(spec(tmp_path, tiny_model_dir, max_steps=3))
    assert result["steps"] == 3
