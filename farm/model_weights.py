"""How much memory a model needs, from its files: weights from safetensors headers (only the header is read, never
the tensors), GGUF by file size, plus a KV-cache reserve from `config.json`. Import-light: workers use it too."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

# Bytes per element of every safetensors dtype.
DTYPE_BYTES = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_HEADER_MAX = 100 * 2**20  # the format caps the JSON header at 100 MB
_TORCH_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8}


class WeightsUnknown(ValueError):
    """The directory holds no weights this module can size."""


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of one safetensors file: 8 bytes of little-endian length, then that many bytes of JSON."""
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise WeightsUnknown(f"{path}: too short for a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > _HEADER_MAX:
            raise WeightsUnknown(f"{path}: header of {length} bytes is over the format's limit")
        return json.loads(handle.read(length))


def safetensors_bytes(path: Path) -> int:
    """Bytes of the tensors one safetensors file holds, computed from dtype and shape in its header."""
    total = 0
    for name, tensor in safetensors_header(path).items():
        if name == "__metadata__":
            continue
        size = DTYPE_BYTES.get(tensor["dtype"])
        if size is None:
            raise WeightsUnknown(f"{path}: tensor {name} has unknown dtype {tensor['dtype']}")
        total += size * math.prod(tensor["shape"])
    return total


def weights_bytes(source: Path) -> int:
    """Memory the weights take once loaded: the sum over `*.safetensors` files (headers only), or a GGUF file's
    size (quantized blocks load as they are stored)."""
    if source.is_file() and source.suffix == ".gguf":
        return source.stat().st_size
    files = sorted(source.glob("*.safetensors")) if source.is_dir() else []
    if not files:
        ggufs = sorted(source.glob("*.gguf")) if source.is_dir() else []
        if ggufs:
            return ggufs[0].stat().st_size
        raise WeightsUnknown(f"{source}: no *.safetensors or *.gguf weights")
    return sum(safetensors_bytes(path) for path in files)


def kv_cache_bytes_per_token(config: dict[str, Any], *, dtype_bytes: int | None = None) -> int:
    """K and V for one token across all layers: 2 x layers x KV heads x head dim x bytes per element."""
    text = config.get("text_config") or config
    layers = int(text["num_hidden_layers"])
    heads = int(text["num_attention_heads"])
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or text["hidden_size"] // heads)
    if dtype_bytes is None:
        declared = text.get("torch_dtype") or text.get("dtype") or config.get("torch_dtype") or config.get("dtype")
        dtype_bytes = _TORCH_DTYPE_BYTES.get(str(declared), 2)
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def memory_need_bytes(source: Path, engine_args: dict[str, Any], *, sequences: int = 4) -> tuple[int, int]:
    """(weights, KV-cache reserve) for serving `source` with these engine args: the reserve holds `sequences`
    full-length sequences (`max_model_len`, else the model's `max_position_embeddings`)."""
    weights = weights_bytes(source)
    config_path = (source if source.is_dir() else source.parent) / "config.json"
    if not config_path.exists():
        return weights, 0
    config = json.loads(config_path.read_text())
    text = config.get("text_config") or config
    max_len = int(engine_args.get("max_model_len") or text.get("max_position_embeddings") or 2048)
    dtype = _TORCH_DTYPE_BYTES.get(str(engine_args.get("kv_cache_dtype") or engine_args.get("dtype") or ""))
    return weights, kv_cache_bytes_per_token(config, dtype_bytes=dtype) * max_len * sequences
