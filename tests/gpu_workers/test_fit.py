"""A worker checks that each spec fits before it loads or advertises it (gpu_workers.fit over farm.placement)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from farm import redis_keys
from gpu_workers.fit import spec_fit
from gpu_workers.hardware import HardwareReport, read_gpus
from tests.gpu_workers.test_hardware import RecordedNvml

ROOT = Path(__file__).resolve().parents[2]


def gpu_host() -> HardwareReport:
    driver, gpus = read_gpus(RecordedNvml())  # an H100 with 60 GiB free and a T4 with 15 GiB free
    return HardwareReport(
        kind="gpu",
        hostname="h",
        driver=driver,
        gpus=gpus[:1],
        cpu_cores=32,
        memory_total_mib=256 * 1024,
        memory_available_mib=200 * 1024,
    )


def cpu_host(ram_gib: int = 16) -> HardwareReport:
    return HardwareReport(
        kind="cpu", hostname="c", cpu_cores=8, memory_total_mib=ram_gib * 1024, memory_available_mib=ram_gib * 1024 // 2
    )


def big_model(tmp_path: Path, *, params_billion: float, config_from: Path) -> Path:
    """A model directory whose safetensors file is a header only (no tensor bytes): `params_billion` BF16 params."""
    out = tmp_path / f"big-{params_billion}b"
    out.mkdir()
    shutil.copy(config_from / "config.json", out / "config.json")
    rows = int(params_billion * 1e9 / 4096)
    header = json.dumps({"w": {"dtype": "BF16", "shape": [rows, 4096], "data_offsets": [0, rows * 4096 * 2]}}).encode()
    (out / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    return out


@pytest.mark.parametrize(
    ("spec", "fits"),
    [
        ({"engine": "vllm", "resource_profile": "gpu:H100"}, True),
        ({"engine": "vllm", "resource_profile": "cpu"}, True),  # a GPU engine on the default profile
        ({"engine": "vllm", "resource_profile": "gpu:A100-80GB"}, False),
        ({"engine": "vllm", "resource_profile": "gpu:H100 x2"}, False),
    ],
)
def test_profiles_on_a_gpu_host(spec: dict, fits: bool, tiny_model_dir: Path) -> None:
    report = spec_fit(name="s", spec=spec, source_path=tiny_model_dir, hardware=gpu_host(), cpu_kv_cache_gib=2)
    assert report.fits is fits, report.reason


def test_a_model_bigger_than_the_free_vram_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    spec = {"engine": "vllm", "resource_profile": "gpu:H100"}
    small = spec_fit(
        name="s",
        spec=spec,
        source_path=big_model(tmp_path, params_billion=8, config_from=tiny_model_dir),
        hardware=gpu_host(),
        cpu_kv_cache_gib=2,
    )
    assert small.fits and small.need_bytes > 16 * 10**9
    big = spec_fit(
        name="s",
        spec=spec,
        source_path=big_model(tmp_path, params_billion=34, config_from=tiny_model_dir),
        hardware=gpu_host(),
        cpu_kv_cache_gib=2,
    )
    assert not big.fits and "GiB free VRAM" in big.reason and big.free_bytes == 60 * 2**30


def test_cpu_hosts_count_the_cpu_kv_cache(tiny_model_dir: Path) -> None:
    spec = {"engine": "vllm-cpu", "resource_profile": "cpu"}
    assert spec_fit(name="s", spec=spec, source_path=tiny_model_dir, hardware=cpu_host(16), cpu_kv_cache_gib=2).fits
    refused = spec_fit(name="s", spec=spec, source_path=tiny_model_dir, hardware=cpu_host(1), cpu_kv_cache_gib=2)
    assert not refused.fits and "GiB RAM" in refused.reason


def test_a_worker_refuses_a_spec_that_does_not_fit_before_advertising_it(
    tmp_path: Path,
    tiny_model_dir: Path,
) -> None:
    """The real worker process, on this CPU host: a 2,000-billion-parameter header cannot fit any RAM here."""
    from farm.redis_client import sync_redis
    from settings import env

    source = big_model(tmp_path, params_billion=2000, config_from=tiny_model_dir)
    client = sync_redis()
    definition = {
        "name": "fit-too-big",
        "model": "m",
        "engine": "vllm-cpu",
        "source": str(source),
        "engine_args": {},
        "resource_profile": "cpu",
        "queue": "infer.fit-too-big",
    }
    client.hset(redis_keys.SPEC_CATALOG, "fit-too-big", orjson.dumps(definition))
    try:
        result = subprocess.run(
            [sys.executable, "-m", "gpu_workers", "--spec", "fit-too-big", "--worker-id", "fit-test", "--no-nvml"],
            check=False,
            cwd=ROOT,
            env={**os.environ, "REDIS_URL": env.REDIS_URL},
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        client.hdel(redis_keys.SPEC_CATALOG, "fit-too-big")
    assert result.returncode != 0
    assert "spec fit-too-big does not fit this worker: needs" in result.stderr
    assert not client.exists(redis_keys.worker("fit-test"))  # never advertised
