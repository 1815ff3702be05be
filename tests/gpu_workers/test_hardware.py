"""Hardware probe: GPUs read through NVML (a recorded answer here, the real one on GPU hosts), CPU fallback."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import psutil
import pynvml
import pytest

from gpu_workers.hardware import GpuInfo, HardwareReport, probe_hardware, read_gpus

GIB = 2**30
MIB = 2**20


class RecordedNvml:
    """pynvml's functions as one host answered them: an H100 that reports everything (strings as `str`, like
    nvidia-ml-py >= 12) and an older board that answers in `bytes` and does not support utilisation or power."""

    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU

    def __init__(self) -> None:
        self.boards: list[dict[str, Any]] = [
            {
                "name": "NVIDIA H100 80GB HBM3",
                "uuid": "GPU-0b9a4c1e-2f7d-4c55-9a1c-3e2d1f0a9b8c",
                "memory": pynvml.c_nvmlMemory_t(total=80 * GIB + 123, free=60 * GIB, used=20 * GIB + 123),
                "utilization": SimpleNamespace(gpu=37, memory=12),
                "temperature": 41,
                "power_mw": 123_456,
            },
            {
                "name": b"Tesla T4",
                "uuid": b"GPU-7f3e2d1c-0b9a-4c55-8e7d-6c5b4a392817",
                "memory": pynvml.c_nvmlMemory_t(total=15 * GIB + 360 * MIB, free=15 * GIB, used=360 * MIB),
                "utilization": None,
                "temperature": 30,
                "power_mw": None,
            },
        ]

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlDeviceGetCount(self) -> int:
        return len(self.boards)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> dict[str, Any]:
        return self.boards[index]

    def nvmlDeviceGetName(self, handle: dict[str, Any]) -> str | bytes:
        return handle["name"]

    def nvmlDeviceGetUUID(self, handle: dict[str, Any]) -> str | bytes:
        return handle["uuid"]

    def nvmlDeviceGetMemoryInfo(self, handle: dict[str, Any]) -> pynvml.c_nvmlMemory_t:
        return handle["memory"]

    def nvmlDeviceGetUtilizationRates(self, handle: dict[str, Any]) -> SimpleNamespace:
        return self._supported(handle["utilization"])

    def nvmlDeviceGetTemperature(self, handle: dict[str, Any], sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._supported(handle["temperature"])

    def nvmlDeviceGetPowerUsage(self, handle: dict[str, Any]) -> int:
        return self._supported(handle["power_mw"])

    @staticmethod
    def _supported(value: Any) -> Any:
        if value is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return value


def test_read_gpus_from_a_recorded_nvml_answer() -> None:
    driver, gpus = read_gpus(RecordedNvml())
    assert driver == "550.54.15"
    assert gpus == [
        GpuInfo(
            index=0,
            name="NVIDIA H100 80GB HBM3",
            uuid="GPU-0b9a4c1e-2f7d-4c55-9a1c-3e2d1f0a9b8c",
            memory_total_mib=80 * 1024,
            memory_free_mib=60 * 1024,
            memory_used_mib=20 * 1024,
            utilization_pct=37,
            temperature_c=41,
            power_w=123.456,
        ),
        GpuInfo(
            index=1,
            name="Tesla T4",
            uuid="GPU-7f3e2d1c-0b9a-4c55-8e7d-6c5b4a392817",
            memory_total_mib=15 * 1024 + 360,
            memory_free_mib=15 * 1024,
            memory_used_mib=360,
            utilization_pct=None,
            temperature_c=30,
            power_w=None,
        ),
    ]


def test_read_gpus_with_no_device() -> None:
    nvml = RecordedNvml()
    nvml.boards = []
    assert read_gpus(nvml) == ("550.54.15", [])


def test_read_gpus_lets_other_nvml_errors_through() -> None:
    nvml = RecordedNvml()
    nvml.nvmlDeviceGetMemoryInfo = lambda handle: RecordedNvml._supported(None)  # type: ignore[method-assign]
    with pytest.raises(pynvml.NVMLError):
        read_gpus(nvml)


@pytest.mark.parametrize(
    ("vram_mib", "expected"),
    [
        ((), "cpu"),
        ((80 * 1024,), "gpu-80gb"),
        ((15 * 1024 + 360,), "gpu-15gb"),
        ((24 * 1024, 80 * 1024 - 1), "gpu-79gb"),
    ],
)
def test_hardware_class(vram_mib: tuple[int, ...], expected: str) -> None:
    gpus = [
        GpuInfo(
            index=i,
            name="gpu",
            uuid=f"GPU-{i}",
            memory_total_mib=m,
            memory_free_mib=m,
            memory_used_mib=0,
            utilization_pct=None,
            temperature_c=None,
            power_w=None,
        )
        for i, m in enumerate(vram_mib)
    ]
    report = HardwareReport(kind="gpu" if gpus else "cpu", hostname="h", gpus=gpus)
    assert report.hardware_class == expected


def assert_cpu_facts(report: HardwareReport) -> None:
    assert report.hostname
    assert report.cpu_cores == os.cpu_count() > 0
    assert 0 < report.memory_available_mib <= report.memory_total_mib == psutil.virtual_memory().total // MIB
    assert set(report.cpu_flags) <= {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma", "sse4_2"}


def test_probe_falls_back_to_cpu_where_nvml_cannot_start() -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("NVML works on this host: the CPU fallback cannot be observed")
    report = probe_hardware(use_nvml=True)
    assert (report.kind, report.gpus, report.driver, report.hardware_class) == ("cpu", [], None, "cpu")
    assert_cpu_facts(report)


def test_probe_without_nvml_reports_cpu_only() -> None:
    report = probe_hardware(use_nvml=False)
    assert (report.kind, report.gpus, report.hardware_class) == ("cpu", [], "cpu")
    assert_cpu_facts(report)
    assert report.as_dict()["cpu_cores"] == report.cpu_cores


@pytest.mark.gpu
def test_probe_reads_every_gpu_field_through_real_nvml() -> None:
    report = probe_hardware()
    assert report.kind == "gpu"
    assert report.driver and report.driver[0].isdigit()
    assert report.hardware_class == f"gpu-{max(g.memory_total_mib for g in report.gpus) // 1024}gb"
    assert_cpu_facts(report)
    for index, gpu in enumerate(report.gpus):
        assert gpu.index == index
        assert isinstance(gpu.name, str) and gpu.name
        assert isinstance(gpu.uuid, str) and gpu.uuid.startswith(("GPU-", "MIG-"))
        assert gpu.memory_total_mib > 1024
        assert 0 <= gpu.memory_used_mib <= gpu.memory_total_mib
        assert 0 <= gpu.memory_free_mib <= gpu.memory_total_mib
        assert gpu.utilization_pct is None or 0 <= gpu.utilization_pct <= 100
        assert gpu.temperature_c is None or 0 < gpu.temperature_c < 120
        assert gpu.power_w is None or 0 < gpu.power_w < 2000
