"""A private farm for the benchmark, brought up the way `tests/live_farm.py` and `manage.py runfarm` do it.

Its own FARM_HOME (SQLite database, logs) in a temporary directory, an embedded Valkey on a free port, the model
declared by a generated models YAML (`manage.py loadmodels`), one API key (`manage.py createapikey`), then the control
worker (with beat: the reaper and sweeper run as in `runfarm`), the API and one worker from `farm.processes`.
Nothing here touches the developer's `.farm/` or Redis.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm import processes
from farm.embedded_redis import start_embedded_redis

ROOT = Path(__file__).resolve().parent.parent


def fresh_database(server_url: str, label: str) -> tuple[str, Callable[[], None]]:
    """(URL of a new empty database on a PostgreSQL server, a function that drops it), for `--postgres URL`."""
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    name = f"farm_bench_{label}_{os.getpid()}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return urlunsplit(urlsplit(server_url)._replace(path=f"/{name}")), drop


@dataclass
class PrivateFarm:
    home: Path
    model_dir: Path
    engine_args: dict[str, Any]
    port: int
    redis_port: int
    worker_concurrency: int
    extra_env: dict[str, str] = field(default_factory=dict)
    children: dict[str, subprocess.Popen] = field(default_factory=dict)
    api_key: str = ""

    @property
    def model_name(self) -> str:
        return self.model_dir.name

    @property
    def spec_name(self) -> str:
        return f"{self.model_dir.name.lower()}-bench-cpu"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    def env(self) -> dict[str, str]:
        """The children's environment; `extra_env` may set DATABASE_URL (see `fresh_database`)."""
        return {
            **os.environ,
            "DATABASE_URL": f"sqlite:///{self.home / 'farm.sqlite3'}",
            **self.extra_env,
            "FARM_HOME": str(self.home),
            "REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "FARM_MODEL_DIR": str(self.model_dir.parent),
            "PYTHONUNBUFFERED": "1",
            # Served like production: no per-query bookkeeping of DEBUG (the tests leave development defaults).
            "DEBUG": "0",
        }

    def manage(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *args], cwd=ROOT, env=self.env(), capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return done.stdout

    def models_yaml(self) -> Path:
        """The models file: the bench model with one vllm-cpu spec carrying exactly the bench's engine args."""
        path = self.home / "models.yaml"
        declaration = {
            "models": [
                {
                    "name": self.model_name,
                    "source": str(self.model_dir),
                    "engine_args": self.engine_args,
                    "specs": [
                        {"name": self.spec_name, "engine": "vllm-cpu", "resource_profile": "cpu", "min_replicas": 1}
                    ],
                }
            ]
        }
        path.write_text(json.dumps(declaration, indent=2))  # JSON is YAML
        return path

    def spawn(self, name: str, command: list[str]) -> None:
        log = (self.log_dir / f"{name}.log").open("ab")
        self.children[name] = processes.spawn_child(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env()
        )

    def start(self, *, worker: bool = True) -> None:
        """Prepares state and starts every process (the worker unless `worker=False`: see `start_worker`);
        readiness is checked by the caller (it owns the HTTP client)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children["redis"] = start_embedded_redis(
            port=self.redis_port, data_dir=self.home / "redis", log_file=self.log_dir / "redis.log"
        )
        self.manage("migrate", "--verbosity", "0")
        self.manage("loadmodels", str(self.models_yaml()))
        self.api_key = self.manage("createapikey", "--user", "bench", "--name", "bench").strip().splitlines()[-1]
        # With beat, as `runfarm`: the reaper's sweeps are part of the farm's cost, and a job whose message is lost is
        # published again (without it, a lost message left its request waiting until the client gave up).
        self.spawn("control", processes.control_worker_command(beat_schedule=str(self.home / "celerybeat-schedule")))
        self.spawn("api", processes.api_command(host="127.0.0.1", port=self.port))
        if worker:
            self.start_worker()

    def start_worker(self, name: str = "worker", *, lazy: bool = False) -> None:
        """Starts a worker for the bench spec (loaded at start, or on the first request when `lazy`); its log is
        `<log_dir>/<name>.log`."""
        specs = {"specs": [], "lazy_specs": [self.spec_name]} if lazy else {"specs": [self.spec_name]}
        self.spawn(
            name, processes.gpu_worker_command(**specs, worker_id=f"bench-{name}", concurrency=self.worker_concurrency)
        )

    def stop_child(self, name: str) -> None:
        """Stops one process (SIGTERM, then its whole process group)."""
        process = self.children.pop(name)
        process.terminate()
        stop_process_group(process, timeout=60)

    def check_alive(self) -> None:
        for name, process in self.children.items():
            if process.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"farm {name} exited with {process.returncode}:\n{tail}")

    def stop(self) -> None:
        """Workers and API first (they hand work back), Redis last; each process group is killed if it lingers."""
        others = [name for name in self.children if name != "redis"]
        for group in (others, ["redis"] if "redis" in self.children else []):
            for name in group:
                if self.children[name].poll() is None:
                    self.children[name].terminate()
            for name in group:
                stop_process_group(self.children[name], timeout=30)
        self.children.clear()


def stop_process_group(process: subprocess.Popen, *, timeout: float) -> None:
    """Waits for `process` (already asked to stop), then kills what is left of its process group.

    vLLM's engine-core and model-runner processes stay in the group of the process that started them and can
    outlive it; every process the bench starts has a group of its own (`farm.processes.spawn_child`).
    """
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
