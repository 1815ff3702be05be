"""`manage.py runfarm`, the README's first command, end to end on its embedded defaults (SQLite under FARM_HOME, an
embedded Valkey): it serves a chat completion through the openai SDK, and SIGINT stops it with nothing left behind.

The farm is started the way a script's background job (`manage.py runfarm &`) starts: with SIGINT ignored, which a
Python program otherwise keeps; a stop must not depend on how the farm was launched. The tiny model stands in for the
demo model, whose load would add minutes to the suite.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import psutil
import yaml

from tests.conftest import ROOT, TINY_MODEL, TINY_SPEC, tiny_model_entry
from tests.services import free_port

STARTUP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 120.0


def _wait_for_banner(farm: subprocess.Popen, output: Path) -> str:
    """The API key the banner shows once the farm is up."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        text = output.read_text(errors="replace")
        if "farm is up." in text:
            return re.search(r"API key:\s+(\S+)", text).group(1)
        assert farm.poll() is None, f"runfarm exited with {farm.returncode}:\n{text[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"runfarm was not up in {STARTUP_TIMEOUT_S:.0f}s:\n{output.read_text()[-3000:]}")


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_runfarm_serves_on_embedded_defaults_and_stops_on_sigint(tmp_path: Path, tiny_model_dir: Path) -> None:
    ports = {name: free_port() for name in ("FARM_PORT", "FLOWER_PORT", "FARM_EMBEDDED_REDIS_PORT")}
    environ = {name: value for name, value in os.environ.items() if name not in ("DATABASE_URL", "REDIS_URL")}
    environ |= {name: str(port) for name, port in ports.items()}
    environ |= {"FARM_HOME": str(tmp_path / "home"), "FARM_MODEL_DIR": str(tiny_model_dir.parent)}
    output = tmp_path / "runfarm.out"
    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump({"models": [tiny_model_entry(tiny_model_dir)]}))
    command = [sys.executable, "manage.py", "runfarm", "--models", str(models), "--worker-spec", TINY_SPEC]
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as `&` in a script does; the child inherits it
    try:
        with output.open("wb") as handle:
            farm = subprocess.Popen(command, cwd=ROOT, env=environ, stdout=handle, stderr=subprocess.STDOUT)
    finally:
        signal.signal(signal.SIGINT, previous)
    children: list[psutil.Process] = []
    try:
        key = _wait_for_banner(farm, output)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports['FARM_PORT']}/v1", api_key=key, max_retries=0)
        answer = client.chat.completions.create(
            model=TINY_MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=4, timeout=60
        )
        assert answer.usage.completion_tokens == 4 and answer.choices[0].finish_reason == "length"
        assert (tmp_path / "home" / "farm.sqlite3").exists()
        assert _listening(ports["FARM_EMBEDDED_REDIS_PORT"]) and _listening(ports["FLOWER_PORT"])
        children = psutil.Process(farm.pid).children(recursive=True)
        names = " ".join(" ".join(child.cmdline()) for child in children)
        for part in ("valkey", "uvicorn api.asgi", "-Q control", "flower", f"--spec {TINY_SPEC}", "--train cpu"):
            assert part in names, f"no {part} among runfarm's processes: {names}"

        farm.send_signal(signal.SIGINT)
        assert farm.wait(timeout=STOP_TIMEOUT_S) == 0, output.read_text()[-3000:]
        assert "stopping the farm" in output.read_text()
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], f"left running after the stop: {[child.cmdline() for child in alive]}"
        assert not any(_listening(port) for port in ports.values())
    finally:
        if farm.poll() is None:
            farm.kill()
            farm.wait()
        for child in children:
            if child.is_running():
                child.kill()
