"""Hardware probe: GPUs through NVML (`nvidia-ml-py`), CPU facts where NVML is absent.

Never through `torch.cuda`: NVML does not create a CUDA context, so probing is safe before a fork.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    uuid: str
    memory_total_mib: int
    memory_free_mib: int
    memory_used_mib: int
    utilization_pct: int | None
    temperature_c: int | None
    power_w: float | None


@dataclass(frozen=True)
class HardwareReport:
    kind: str  # "gpu" or "cpu"
    hostname: str
    driver: str | None = None
    gpus: list[GpuInfo] = field(default_factory=list)
    cpu_cores: int = 0
    memory_total_mib: int = 0
    memory_available_mib: int = 0
    cpu_flags: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def hardware_class(self) -> str:
        """Coarse class used for `train.<class>` queues: `cpu` or `gpu-<VRAM GiB>gb`."""
        if not self.gpus:
            return "cpu"
        return f"gpu-{max(g.memory_total_mib for g in self.gpus) // 1024}gb"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def read_gpus(nvml: Any) -> tuple[str, list[GpuInfo]]:
    """Reads every device through an initialised NVML module (the real `pynvml`, or a recording in tests)."""
    driver = _text(nvml.nvmlSystemGetDriverVersion())
    gpus = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        gpus.append(
            GpuInfo(
                index=index,
                name=_text(nvml.nvmlDeviceGetName(handle)),
                uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                memory_total_mib=memory.total // 2**20,
                memory_free_mib=memory.free // 2**20,
                memory_used_mib=memory.used // 2**20,
                utilization_pct=_optional(nvml, lambda h: nvml.nvmlDeviceGetUtilizationRates(h).gpu, handle),
                temperature_c=_optional(
                    nvml, lambda h: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU), handle
                ),
                power_w=_optional(nvml, lambda h: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0, handle),
            )
        )
    return driver, gpus


def _optional(nvml: Any, read: Any, handle: Any) -> Any:
    """Some boards do not report utilisation, temperature or power; that is not an error."""
    try:
        return read(handle)
    except nvml.NVMLError:
        return None


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    wanted = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma", "sse4_2"}
                    return sorted(wanted.intersection(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []


def probe_hardware(*, use_nvml: bool = True) -> HardwareReport:
    """What this host offers: GPUs when NVML finds any, else CPU capacity."""
    memory = psutil.virtual_memory()
    base = {
        "hostname": platform.node(),
        "cpu_cores": os.cpu_count() or 1,
        "memory_total_mib": memory.total // 2**20,
        "memory_available_mib": memory.available // 2**20,
        "cpu_flags": _cpu_flags(),
    }
    if use_nvml:
        try:
            import pynvml

            pynvml.nvmlInit()
            try:
                driver, gpus = read_gpus(pynvml)
            finally:
                pynvml.nvmlShutdown()
            if gpus:
                return HardwareReport(kind="gpu", driver=driver, gpus=gpus, **base)
        except Exception as exc:  # NVML missing (no driver/library) is the normal CPU-host case.
            log.info("NVML unavailable (%s): advertising CPU capacity", exc.__class__.__name__)
    return HardwareReport(kind="cpu", **base)
