"""schemathesis (`st run`) against the served OpenAPI document and a live farm: every operation, every check.

The bar: no 5xx anywhere, every status, content type, header and body as documented, schema-valid requests
accepted, schema-violating ones rejected, undeclared methods 405 (phases: examples, coverage, fuzzing, stateful).
What keeps it short on 2 cores is in `fuzz_hooks.py`; no check is switched off. `FARM_FUZZ_SEED` and
`FARM_FUZZ_EXAMPLES` widen a run locally (the seed is fixed by default, so CI runs are reproducible).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import TINY_MODEL, TINY_SPEC, LiveFarm
from tests.live_farm import spec_served, start_worker, wait_for

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parents[2]
ST = Path(sys.executable).with_name("st")


def ensure_tiny_model_served(live_farm: LiveFarm) -> None:
    """Tests earlier in a session kill the session farm's worker on purpose; fuzzing needs one serving."""
    if spec_served(TINY_SPEC):
        return
    worker = live_farm.processes.children.get("worker-1")
    if worker is None or worker.poll() is not None:
        start_worker(live_farm.processes, name="worker-1", spec=TINY_SPEC)
    wait_for(lambda: spec_served(TINY_SPEC), timeout=240, farm=live_farm.processes, what="the tiny-model worker")


def test_every_operation_conforms_and_never_errors(live_farm: LiveFarm, tmp_path: Path) -> None:
    ensure_tiny_model_served(live_farm)
    command = [
        str(ST),
        "run",
        f"{live_farm.base_url}/api/schema/",
        "--header",
        f"Authorization: Bearer {live_farm.api_key}",
        "--checks",
        "all",
        # Multipart upload: schemathesis sends the `binary` part as a plain form field, which is not a file upload;
        # `test_files.py` covers uploads through the openai SDK and raw multipart.
        "--exclude-operation-id",
        "createFile",
        "--max-examples",
        os.environ.get("FARM_FUZZ_EXAMPLES", "30"),
        "--seed",
        os.environ.get("FARM_FUZZ_SEED", "20261123"),
        "--request-timeout",
        "60",
        "--max-response-time",
        "60",  # a hung request fails the run (the default 10 s flakes on a busy 2-core CI box)
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
        "--no-color",
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.api.fuzz_hooks", "FARM_FUZZ_MODEL": TINY_MODEL}
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    output = run.stdout + run.stderr
    summary = [line for line in output.splitlines() if re.search(r"generated|Coverage \(|Fuzzing \(|Stateful \(", line)]
    print("\n" + "\n".join(summary))
    assert run.returncode == 0, output[-20_000:]
    # Every documented operation (but the excluded upload) was exercised, not skipped for want of data.
    document = httpx.get(f"{live_farm.base_url}/api/schema/", timeout=60).json()
    operations = sum(
        method in ("get", "post", "put", "patch", "delete") for item in document["paths"].values() for method in item
    )
    tested = re.search(r"Tested: (\d+)", output)
    assert tested and int(tested[1]) == operations - 1, output[-5_000:]
