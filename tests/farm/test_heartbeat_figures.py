"""Reading heartbeats defensively: NVML figures in any of the shapes workers send, missing figures as None."""

from __future__ import annotations

import pytest

from farm.heartbeat_figures import device_figures, worker_figures

MIB = 2**20
NVML_DEVICE = {
    "index": 0,
    "name": "NVIDIA H100 80GB HBM3",
    "uuid": "GPU-1",
    "memory_total_mib": 81559,
    "memory_free_mib": 61559,
    "memory_used_mib": 20000,
    "utilization_pct": 37,
    "temperature_c": 51,
    "power_w": 312.5,
}


def test_a_gpu_heartbeat_from_the_hardware_probe() -> None:
    entry = {
        "worker_id": "w",
        "hostname": "h",
        "status": "draining",
        "specs": ["s"],
        "queues": ["infer.s"],
        "hardware": {"kind": "gpu", "gpus": [NVML_DEVICE], "cpu_cores": 32},
        "load": {"running": 3, "capacity": 8, "tokens": 900, "tokens_per_s": 12.5},
        "ts": 100.0,
        "models": [
            {"spec": "s", "model": "m", "weights_bytes": 3 * 2**30},
            {"spec": "t", "weights_bytes": None},
            "junk",
        ],
    }
    figures = worker_figures(entry)
    assert figures.status == "draining"
    assert figures.kind == "gpu"
    assert figures.queues == ("infer.s",)
    assert figures.load_pct == pytest.approx(37.5)
    assert figures.tokens_per_s == 12.5
    assert [(m.spec, m.weights_bytes) for m in figures.loaded] == [("s", 3 * 2**30), ("t", None)]
    (device,) = figures.devices
    assert device.memory_total_bytes == 81559 * MIB
    assert device.memory_used_bytes == 20000 * MIB
    assert device.memory_used_pct == pytest.approx(100 * 20000 / 81559)
    assert (device.utilization_pct, device.temperature_c, device.power_w) == (37, 51, 312.5)


@pytest.mark.parametrize(
    "entry",
    [
        {
            "devices": [
                {
                    "index": 1,
                    "name": "A100",
                    "vram_total_bytes": 80 * 2**30,
                    "vram_free_bytes": 60 * 2**30,
                    "gpu_utilization_pct": 90,
                }
            ]
        },
        {
            "hardware": {
                "devices": [
                    {"index": 1, "name": "A100", "memory": {"total": 80 * 2**30, "free": 60 * 2**30}, "utilization": 90}
                ]
            }
        },
    ],
)
def test_other_shapes_of_per_device_figures(entry: dict) -> None:
    (device,) = device_figures(entry)
    assert device.index == 1
    assert device.memory_total_bytes == 80 * 2**30
    assert device.memory_used_bytes == 20 * 2**30  # derived from total - free
    assert device.utilization_pct == 90


def test_a_cpu_worker_and_garbage_figures() -> None:
    entry = {
        "worker_id": "cpu-1",
        "hardware": {"kind": "cpu", "cpu_cores": 2, "memory_total_mib": 4096, "memory_available_mib": 1024, "gpus": []},
        "load": {"running": "many", "capacity": 0, "tokens_per_s": None},
        "specs": "not-a-list",
    }
    figures = worker_figures(entry)
    assert figures.kind == "cpu"
    assert figures.devices == ()
    assert figures.cpu_cores == 2
    assert figures.memory_total_bytes == 4096 * MIB
    assert figures.running == 0
    assert figures.load_pct == 0.0
    assert figures.tokens_per_s is None
    assert figures.specs == ()
    assert worker_figures({}).status == "ready"
    assert device_figures({"devices": ["junk", {"name": "x"}]})[0].memory_total_bytes is None
