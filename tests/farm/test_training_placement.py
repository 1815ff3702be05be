"""`farm.training_placement`: model size -> LoRA training memory -> hardware class, table-driven (pure)."""

from __future__ import annotations

import pytest

from farm.training_placement import (
    CPU_CLASS,
    GIB,
    HardwareClass,
    ModelSize,
    choose_hardware_class,
    lora_training_bytes,
    parse_hardware_classes,
    size_from_config,
    size_from_safetensors_headers,
)

CLASSES = [
    HardwareClass("gpu-24gb", 24 * GIB),
    HardwareClass("gpu-80gb", 80 * GIB),
    HardwareClass("gpu-48gb", 48 * GIB),
]
LLAMA_8B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "tie_word_embeddings": False,
}


def test_safetensors_headers_count_every_tensor_element() -> None:
    headers = [
        {"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [128, 64], "data_offsets": [0, 1]}},
        {"b": {"dtype": "BF16", "shape": [10], "data_offsets": [0, 1]}, "c": {"dtype": "F32", "shape": []}},
    ]
    size = size_from_safetensors_headers(headers, {"hidden_size": 128, "num_hidden_layers": 2})
    assert size == ModelSize(parameters=128 * 64 + 10 + 1, hidden_size=128, num_layers=2)


def test_config_estimate_of_llama_3_8b_is_close_to_its_real_size() -> None:
    assert 7.9e9 < size_from_config(LLAMA_8B).parameters < 8.1e9  # Llama-3.1-8B: 8.03 B parameters


def test_the_tiny_test_model_config_matches_its_weights(tiny_model_dir) -> None:
    from farm.fine_tuning import model_size_read

    exact = model_size_read(str(tiny_model_dir))
    import json

    estimate = size_from_config(json.loads((tiny_model_dir / "config.json").read_text()))
    assert exact is not None and exact.parameters == estimate.parameters


@pytest.mark.parametrize(
    ("billions", "cpu_only", "expected"),
    [
        (0.000_6, False, "gpu-24gb"),  # the tiny model: smallest class
        (8.0, False, "gpu-24gb"),  # 8B in bf16 (16 GB) + activations + adapter: fits 24 GB
        (13.0, False, "gpu-48gb"),  # 26 GB of weights
        (30.0, False, "gpu-80gb"),  # 60 GB of weights + 30% activations
        (70.0, False, CPU_CLASS),  # 140 GB: no GPU class holds it -> CPU
        (8.0, True, CPU_CLASS),  # CPU-only specs train on CPU
    ],
)
def test_smallest_class_that_fits(billions: float, cpu_only: bool, expected: str) -> None:
    size = ModelSize(parameters=int(billions * 1e9), hidden_size=4096, num_layers=32)
    need = lora_training_bytes(size, rank=16)
    assert choose_hardware_class(need_bytes=need, classes=CLASSES, cpu_only=cpu_only) == expected


def test_memory_grows_with_the_lora_rank_and_the_model() -> None:
    small = ModelSize(parameters=10**9, hidden_size=2048, num_layers=16)
    big = ModelSize(parameters=2 * 10**9, hidden_size=2048, num_layers=16)
    assert lora_training_bytes(small, rank=64) > lora_training_bytes(small, rank=8)
    assert lora_training_bytes(big, rank=8) > lora_training_bytes(small, rank=8)
    assert lora_training_bytes(small, rank=8) > small.parameters * 2  # at least the bf16 weights


def test_no_classes_means_cpu() -> None:
    assert choose_hardware_class(need_bytes=1, classes=[], cpu_only=False) == CPU_CLASS


def test_hardware_classes_parse_and_reject_bad_entries() -> None:
    assert parse_hardware_classes("gpu-24gb=24, gpu-80gb=80,") == [
        HardwareClass("gpu-24gb", 24 * GIB),
        HardwareClass("gpu-80gb", 80 * GIB),
    ]
    for bad in ("gpu", "gpu=0", "=24", "gpu=x"):
        with pytest.raises(ValueError, match="bad hardware class"):
            parse_hardware_classes(bad)
