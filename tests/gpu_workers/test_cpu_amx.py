"""AMX permission for vLLM's CPU model runner (`gpu_workers.cpu_amx`): asked for on hosts with AMX, where a
bfloat16 engine otherwise dies on its first request (the live tests' tiny model runs in bfloat16)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gpu_workers.cpu_amx import host_has_amx, request_amx_permission


def test_amx_is_detected_from_the_cpu_flags() -> None:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert host_has_amx() == (" amx_tile" in flags and sys.platform == "linux")


@pytest.mark.skipif(not host_has_amx(), reason="this CPU has no AMX")
def test_the_kernel_grants_amx_tile_state_to_a_process_that_asks() -> None:
    """In a fresh process (the permission is per process): the request succeeds, and a bfloat16 matrix product,
    which oneDNN runs on AMX tiles here, then works."""
    code = (
        "import torch\n"
        "from gpu_workers.cpu_amx import request_amx_permission\n"
        "assert request_amx_permission()\n"
        "a = torch.ones(64, 64, dtype=torch.bfloat16)\n"
        "print(float((a @ a)[0, 0]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "64.0"


def test_asking_twice_is_harmless() -> None:
    if host_has_amx():
        assert request_amx_permission() and request_amx_permission()
