"""Where a training job runs: a pure decision from the base model's size to a `train.<hardware-class>` queue.

No database, files or clock here: the service (`farm.fine_tuning`) reads safetensors headers or `config.json` and
the configured hardware classes, and asks. The estimate is for LoRA: frozen weights + the adapter's weights,
gradients and AdamW state + activations (a fraction of the weights, measured loosely; a batch of long sequences on
a big model needs more, so classes are chosen with headroom).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CPU_CLASS = "cpu"
GIB = 1024**3

# Bytes per element of the dtypes safetensors headers name.
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
# Per trainable (LoRA) parameter: fp32 weight + fp32 gradient + AdamW's two fp32 moments.
LORA_BYTES_PER_PARAM = 4 + 4 + 8
# Activations and allocator slack, as a fraction of the frozen weights, plus a fixed runtime overhead.
ACTIVATION_FRACTION = 0.3
RUNTIME_OVERHEAD_BYTES = GIB // 2
# A 16-bit GPU copy of the weights is what trains (float32 checkpoints are loaded as bfloat16 on GPUs).
TRAIN_BYTES_PER_WEIGHT = 2


@dataclass(frozen=True)
class ModelSize:
    parameters: int
    hidden_size: int
    num_layers: int


@dataclass(frozen=True)
class HardwareClass:
    name: str
    memory_bytes: int


def size_from_safetensors_headers(headers: list[dict[str, Any]], config: dict[str, Any]) -> ModelSize:
    """Parameter count from the tensors' shapes in the safetensors headers (exact; no weights read)."""
    parameters = 0
    for header in headers:
        for name, tensor in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in tensor["shape"]:
                count *= int(dim)
            parameters += count
    return ModelSize(
        parameters=parameters,
        hidden_size=int(config.get("hidden_size", 0)),
        num_layers=int(config.get("num_hidden_layers", 0)),
    )


def size_from_config(config: dict[str, Any]) -> ModelSize:
    """Llama-style estimate from `config.json` alone (when the weights are not where the control plane can read)."""
    hidden = int(config["hidden_size"])
    layers = int(config["num_hidden_layers"])
    intermediate = int(config.get("intermediate_size", 4 * hidden))
    vocab = int(config.get("vocab_size", 32000))
    heads = int(config.get("num_attention_heads", 1))
    kv_heads = int(config.get("num_key_value_heads", heads))
    head_dim = int(config.get("head_dim") or hidden // heads)
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    mlp = 3 * hidden * intermediate
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return ModelSize(
        parameters=layers * (attention + mlp + 2 * hidden) + embeddings + hidden, hidden_size=hidden, num_layers=layers
    )


def lora_parameters(size: ModelSize, *, rank: int, modules_per_layer: int = 7) -> int:
    """Adapter parameters: rank x (in + out) per adapted linear, approximated with hidden-size squares."""
    return size.num_layers * modules_per_layer * rank * 2 * size.hidden_size


def lora_training_bytes(size: ModelSize, *, rank: int) -> int:
    """Memory to LoRA-train the model: frozen weights, the adapter's training state, activations and overhead."""
    weights = size.parameters * TRAIN_BYTES_PER_WEIGHT
    adapter = lora_parameters(size, rank=rank) * LORA_BYTES_PER_PARAM
    return int(weights * (1 + ACTIVATION_FRACTION) + adapter + RUNTIME_OVERHEAD_BYTES)


def choose_hardware_class(*, need_bytes: int, classes: list[HardwareClass], cpu_only: bool) -> str:
    """The smallest GPU class whose memory holds `need_bytes`; `cpu` when the model is served on CPUs only or no
    class is big enough (a CPU host trains anything, slowly, rather than nothing)."""
    if cpu_only:
        return CPU_CLASS
    fitting = [c for c in classes if c.name != CPU_CLASS and c.memory_bytes >= need_bytes]
    if not fitting:
        return CPU_CLASS
    return min(fitting, key=lambda c: (c.memory_bytes, c.name)).name


def parse_hardware_classes(value: str) -> list[HardwareClass]:
    """`gpu-24gb=24,gpu-80gb=80` (name=GiB) -> classes; raises ValueError naming a bad entry."""
    classes = []
    for raw in value.split(","):
        item = raw.strip()
        if not item:
            continue
        name, sep, gib = item.partition("=")
        try:
            memory = float(gib)
        except ValueError:
            memory = -1.0
        if not sep or memory <= 0 or not name.strip():
            raise ValueError(f"bad hardware class {item!r}: expected name=GiB")
        classes.append(HardwareClass(name=name.strip(), memory_bytes=int(memory * GIB)))
    return classes
