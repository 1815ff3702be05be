"""A live farm for end-to-end tests: the API (uvicorn), the control worker and a vLLM worker on the tiny model,
as real processes sharing the test database and Redis (vLLM's `RemoteOpenAIServer` pattern)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import psutil
import redis

from farm import processes, redis_keys
from farm.registry import live_workers_sync

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class FarmProcesses:
    env: dict[str, str]
    log_dir: Path
    children: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, command: list[str], **extra_env: str) -> subprocess.Popen:
        log = (self.log_dir / f"{name}.log").open("ab")
        process = processes.spawn_child(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**self.env, **extra_env}
        )
        self.children[name] = process
        return process

    def stop(self, name: str, *, timeout: float = 30.0) -> None:
        process = self.children.pop(name)
        descendants = _descendants(process)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        _kill_leftovers(descendants)  # e.g. a vLLM EngineCore whose parent was killed before it could stop it

    def kill(self, name: str) -> float:
        """SIGKILLs a child's whole process group (a worker and its vLLM EngineCore), like a machine dying.
        Returns the `time.time()` of the kill."""
        process = self.children.pop(name)
        killed_at = time.time()
        os.killpg(process.pid, signal.SIGKILL)  # before `wait`: the unreaped leader keeps the group id ours
        process.wait()
        return killed_at

    def signal_and_wait(self, name: str, sig: int, *, timeout: float) -> int:
        """Sends `sig` to the child alone (as Kubernetes does to a container's main process) and waits for it to
        exit by itself; returns its exit status. Past `timeout` the group is killed and TimeoutError raised."""
        process = self.children.pop(name)
        descendants = _descendants(process)
        process.send_signal(sig)
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise TimeoutError(
                f"{name} did not exit within {timeout}s of signal {sig}; its log ends:\n{self.log_tail(name)}"
            ) from None
        finally:
            _kill_leftovers(descendants)
        return returncode

    def descendants(self, name: str) -> list[psutil.Process]:
        """A child's live descendants (a worker's vLLM EngineCore, for instance)."""
        return _descendants(self.children[name])

    @contextlib.contextmanager
    def engines_paused(self, names: list[str]) -> Iterator[PausedEngines]:
        """SIGSTOPs the vLLM engine processes of the named workers, resumes them on exit: their requests stay
        `running` without progress for as long as a test needs, while the workers themselves keep beating,
        consuming and listening for cancels. Paused before a request is sent, they make a test independent of how
        fast the tiny model is (it writes ~900 tokens a second). What an engine made before the pause still reaches
        its worker (vLLM's engine-to-client ZMQ queue has no bound, and a busy worker can be hundreds of tokens
        behind), so a job is surely held only if it started after the pause, or once nothing moves (`wait_quiet`)."""
        found = {name: [p for p in self.descendants(name) if p.name().startswith("VLLM::")] for name in names}
        missing = {
            name: [(p.pid, p.name()) for p in self.descendants(name)] for name, engines in found.items() if not engines
        }
        assert not missing, f"no vLLM engine process under {missing}"
        engines = PausedEngines([p for processes_ in found.values() for p in processes_])
        engines.suspend()
        try:
            yield engines
        finally:
            engines.resume()

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def stop_all(self) -> None:
        for name in list(self.children):
            self.stop(name)

    def check_alive(self) -> None:
        for name, process in self.children.items():
            if process.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{tail}")

    def log_tail(self, name: str, chars: int = 3000) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")[-chars:]


def _descendants(process: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill_leftovers(processes_: list[psutil.Process]) -> None:
    """Kills what is still running of a snapshot (psutil checks the start time, so a reused pid is never hit)."""
    for process in processes_:
        try:
            if process.is_running():
                process.kill()
        except psutil.NoSuchProcess:
            pass


def _status(process: psutil.Process) -> str | None:
    try:
        return process.status()
    except psutil.NoSuchProcess:
        return None


@dataclass
class PausedEngines:
    processes: list[psutil.Process]

    def suspend(self) -> None:
        """SIGSTOPs every engine process and waits until the kernel says each one is stopped."""
        for process in self.processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.suspend()
        deadline = time.monotonic() + 5
        while running := [p for p in self.processes if _status(p) not in (psutil.STATUS_STOPPED, None)]:
            assert time.monotonic() < deadline, f"not stopped: {[(p.pid, p.name(), _status(p)) for p in running]}"
            time.sleep(0.005)

    def resume(self) -> None:
        for process in self.processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.resume()

    def run_until(
        self, predicate: Callable[[], bool], *, timeout: float, what: str, step_s: float = 0.01, settle_s: float = 0.25
    ) -> None:
        """Lets the engines run in short steps until `predicate` holds, and leaves them paused: a job gets its first
        tokens out, and then cannot finish. Each step runs the engines for `step_s` (a few tokens of the tiny
        model), then pauses them and polls `predicate` for up to `settle_s`, so a worker that is slow to forward
        what its engine made (a loaded CI machine) cannot let the engine run on to the end of the job meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            self.resume()
            time.sleep(step_s)
            self.suspend()
            settled = time.monotonic() + settle_s
            while time.monotonic() < settled:
                if predicate():
                    return
                time.sleep(0.005)
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def wait_for(
    predicate, *, timeout: float, farm: FarmProcesses | None = None, what: str = "condition", interval: float = 0.25
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if farm is not None:
            farm.check_alive()
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def wait_quiet(
    snapshot: Callable[[], object], *, quiet_s: float, timeout: float, what: str, interval: float = 0.25
) -> object:
    """Waits until `snapshot()` is not None and has not changed for `quiet_s`; returns it. For a farm whose engines
    are paused: the workers still finish what the engines made before the pause, then nothing moves."""
    deadline = time.monotonic() + timeout
    last: object = None
    since = time.monotonic()
    while time.monotonic() < deadline:
        current = snapshot()
        if current is None or current != last:
            last, since = current, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return current
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last: {last!r})"[:2000])


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def spec_served(spec: str) -> bool:
    return any(spec in worker.specs for worker in live_workers_sync()[0])


def registry_entries(client: redis.Redis) -> dict[str, dict]:
    """The live worker registry (`farm:worker:<id>` JSON values) on a given Redis, by worker id."""
    ids = sorted(i.decode() for i in client.smembers(redis_keys.WORKERS_SET))
    values = client.mget([redis_keys.worker(i) for i in ids]) if ids else []
    return {worker_id: orjson.loads(value) for worker_id, value in zip(ids, values, strict=True) if value is not None}


def start_worker(
    farm: FarmProcesses, *, name: str, spec: str, concurrency: int = 32, **extra_env: str
) -> subprocess.Popen:
    return farm.start(
        name, processes.gpu_worker_command(specs=[spec], worker_id=name, concurrency=concurrency), **extra_env
    )


def child_env(*, database_url: str, model_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "FARM_MODEL_DIR": str(model_dir),
        "PYTHONUNBUFFERED": "1",
        "FARM_HEARTBEAT_S": "1",
        "FARM_WORKER_TTL_S": "4",
    }
