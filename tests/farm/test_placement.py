"""`place_spec`: fit or no fit, LRU unload, cache preference, profiles; and memory estimates from real files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from farm.model_weights import (
    WeightsUnknown,
    kv_cache_bytes_per_token,
    memory_need_bytes,
    safetensors_bytes,
    weights_bytes,
)
from farm.placement import LoadedSpec, Placement, ResourceProfile, SpecDemand, WorkerCapacity, lru_unload, place_spec

GIB = 2**30


def gpu(
    worker_id: str,
    *,
    total: float = 80,
    free: float = 80,
    names: tuple[str, ...] = ("NVIDIA A100-SXM4-80GB",),
    loaded: tuple[LoadedSpec, ...] = (),
    cached: tuple[str, ...] = (),
    ready: bool = True,
) -> WorkerCapacity:
    return WorkerCapacity(
        worker_id=worker_id,
        kind="gpu",
        memory_total_bytes=int(total * GIB),
        memory_free_bytes=int(free * GIB),
        gpu_names=names,
        loaded=loaded,
        cached_sources=frozenset(cached),
        accepts_work=ready,
    )


def cpu(worker_id: str, *, cores: int = 16, total: float = 64, free: float = 64) -> WorkerCapacity:
    return WorkerCapacity(
        worker_id=worker_id,
        kind="cpu",
        memory_total_bytes=int(total * GIB),
        memory_free_bytes=int(free * GIB),
        cpu_cores=cores,
    )


def demand(
    spec: str = "llama-8b", *, weights: float = 16, kv: float = 4, profile: str = "gpu", source: str = "llama-8b"
) -> SpecDemand:
    return SpecDemand(
        spec=spec,
        source=source,
        profile=ResourceProfile.parse(profile),
        weights_bytes=int(weights * GIB),
        kv_reserve_bytes=int(kv * GIB),
    )


def loaded(spec: str, gib: float, last_used: float, running: int = 0) -> LoadedSpec:
    return LoadedSpec(spec=spec, memory_bytes=int(gib * GIB), last_used=last_used, running=running)


L4 = ("NVIDIA L4",)


@pytest.mark.parametrize(
    ("need", "workers", "expected"),
    [
        pytest.param(demand(), [gpu("w", free=20)], "w", id="fits-exactly"),
        pytest.param(demand(), [gpu("w", free=19.9)], None, id="no-fit-no-placement"),
        pytest.param(demand(weights=70, kv=20), [gpu("w", total=80, free=80)], None, id="bigger-than-the-device"),
        pytest.param(demand(), [gpu("w", free=80, ready=False)], None, id="draining-worker-skipped"),
        pytest.param(
            demand(),
            [gpu("big", total=80, free=80), gpu("small", total=24, free=24, names=L4)],
            "small",
            id="best-fit-keeps-the-big-device-free",
        ),
        pytest.param(
            demand(), [gpu("a", free=30), gpu("b", free=30, cached=("llama-8b",))], "b", id="cached-weights-preferred"
        ),
        pytest.param(
            demand(),
            [gpu("a", free=30, cached=("other",)), gpu("b", free=30)],
            "a",
            id="cache-of-another-model-does-not-count-tie-by-id",
        ),
        pytest.param(
            demand(),
            [gpu("cached-but-full", free=5, cached=("llama-8b",), loaded=(loaded("x", 60, 1),)), gpu("free", free=40)],
            "cached-but-full",
            id="cached-weights-beat-an-unload",
        ),
        pytest.param(
            demand(),
            [gpu("a", free=1, loaded=(loaded("llama-8b", 20, 5),)), gpu("b", free=80)],
            "a",
            id="already-loaded-wins",
        ),
        pytest.param(
            demand(profile="gpu:A100-80GB"),
            [gpu("l4", names=L4, total=24, free=24), gpu("a100", free=80)],
            "a100",
            id="gpu-model-must-match",
        ),
        pytest.param(
            demand(profile="gpu:L4 x2"),
            [gpu("one", names=L4, total=24, free=24), gpu("two", names=L4 * 2, total=48, free=48)],
            "two",
            id="device-count-must-match",
        ),
        pytest.param(
            demand(profile="cpu:8", weights=2, kv=1),
            [gpu("g"), cpu("small", cores=4), cpu("big", cores=16)],
            "big",
            id="cpu-profile-needs-a-cpu-worker-with-the-cores",
        ),
        pytest.param(
            demand(profile="cpu", weights=2, kv=1), [cpu("c", total=64, free=2.5)], None, id="cpu-ram-must-fit"
        ),
    ],
)
def test_where_a_spec_goes(need: SpecDemand, workers: list[WorkerCapacity], expected: str | None) -> None:
    placement = place_spec(need, workers)
    assert (placement.worker_id if placement else None) == expected


def test_cache_preference_beats_best_fit_but_not_fit() -> None:
    need = demand()
    placement = place_spec(
        need, [gpu("small", total=24, free=24, names=L4), gpu("cached", total=80, free=80, cached=("llama-8b",))]
    )
    assert placement == Placement(worker_id="cached", cached=True, free_after_bytes=60 * GIB)


@pytest.mark.parametrize(
    ("models", "free", "need", "expected"),
    [
        pytest.param([], 10, 5, (), id="fits-without-unloading"),
        pytest.param([loaded("old", 10, 1), loaded("new", 10, 9)], 2, 10, ("old",), id="least-recently-used-first"),
        pytest.param(
            [loaded("old", 4, 1), loaded("mid", 4, 5), loaded("new", 20, 9)],
            2,
            10,
            ("old", "mid"),
            id="as-many-as-needed-in-lru-order",
        ),
        pytest.param(
            [loaded("busy", 30, 1, running=2), loaded("idle", 10, 5)],
            2,
            10,
            ("idle",),
            id="a-busy-model-is-never-unloaded",
        ),
        pytest.param(
            [loaded("busy", 30, 1, running=1), loaded("idle", 4, 5)], 2, 10, None, id="not-enough-idle-memory-no-fit"
        ),
    ],
)
def test_lru_unload(models: list[LoadedSpec], free: float, need: float, expected: tuple[str, ...] | None) -> None:
    assert lru_unload(models, free_bytes=int(free * GIB), need_bytes=int(need * GIB)) == expected


def test_placement_after_lru_unload() -> None:
    worker = gpu(
        "w",
        free=6,
        loaded=(
            loaded("a", 30, last_used=100),
            loaded("b", 30, last_used=50),
            loaded("c", 10, last_used=10, running=3),
        ),
    )
    placement = place_spec(demand(), [worker])
    assert placement == Placement(worker_id="w", unload=("b",), free_after_bytes=16 * GIB)


@pytest.mark.parametrize(
    ("text", "profile"),
    [
        ("cpu", ResourceProfile(kind="cpu", count=0)),
        ("cpu:16", ResourceProfile(kind="cpu", count=16)),
        ("gpu", ResourceProfile(kind="gpu")),
        ("gpu:A100-80GB", ResourceProfile(kind="gpu", gpu_model="A100-80GB")),
        ("gpu:L4 x2", ResourceProfile(kind="gpu", gpu_model="L4", count=2)),
    ],
)
def test_profiles_parse(text: str, profile: ResourceProfile) -> None:
    assert ResourceProfile.parse(text) == profile


@pytest.mark.parametrize("text", ["tpu", "gpu:", "gpu:A100 x", "cpu:x4 x2", ""])
def test_bad_profiles_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="resource profile"):
        ResourceProfile.parse(text)


# --- memory from the files: the tiny test model's real safetensors and config --------------------------------------


def test_weights_from_the_safetensors_header_of_the_tiny_model(tiny_model_dir: Path) -> None:
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(tiny_model_dir / "model.safetensors"))
    actual = sum(t.numel() * t.element_size() for t in tensors.values())
    assert weights_bytes(tiny_model_dir) == actual
    assert actual > 0 and all(t.dtype == torch.float32 for t in tensors.values())


def test_only_the_header_is_read(tmp_path: Path) -> None:
    """A file whose tensor data is missing altogether is still sized: the data bytes are never read."""
    header = json.dumps(
        {
            "__metadata__": {"format": "pt"},
            "w": {"dtype": "BF16", "shape": [4096, 4096], "data_offsets": [0, 33554432]},
            "b": {"dtype": "F32", "shape": [4096], "data_offsets": [33554432, 33570816]},
        }
    ).encode()
    path = tmp_path / "model-00001-of-00001.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)  # no tensor bytes at all
    assert safetensors_bytes(path) == 4096 * 4096 * 2 + 4096 * 4


def test_no_weights_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnknown):
        weights_bytes(tmp_path)


def test_kv_reserve_from_config(tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    per_token = kv_cache_bytes_per_token(config)
    layers, kv_heads, head_dim = config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]
    assert per_token == 2 * layers * kv_heads * head_dim * 4  # float32
    weights, reserve = memory_need_bytes(tiny_model_dir, {"max_model_len": 1024}, sequences=4)
    assert (weights, reserve) == (weights_bytes(tiny_model_dir), per_token * 1024 * 4)
    # An 8B Llama in bf16: 32 layers x 8 KV heads x 128 dims x 2 (K, V) x 2 bytes = 128 KiB per token.
    llama = {
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_size": 4096,
        "torch_dtype": "bfloat16",
    }
    assert kv_cache_bytes_per_token(llama) == 128 * 1024
