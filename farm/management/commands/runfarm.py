"""`manage.py runfarm`: the whole farm on one machine, with embedded defaults.

Starts (when REDIS_URL is unset) an embedded Valkey server, migrates the database, prepares the demo model, then
runs the API (uvicorn), the control worker with beat, one CPU worker serving the demo model and Flower, and
supervises them until Ctrl-C (SIGINT) or SIGTERM, then stops them: workers first, Valkey last.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from farm import processes
from farm.api_keys import api_key_create, api_key_find
from farm.catalog import spec_catalog_publish
from farm.embedded_redis import start_embedded_redis
from farm.registry import live_workers_sync
from settings import env

DEMO_MODELS = env.BASE_DIR / "deploy" / "models" / "demo.yaml"
DEMO_SPEC = "smollm2-135m-instruct-cpu"
DEMO_MODEL = "smollm2-135m-instruct"


def _last_line(log_file: Path) -> str:
    """The worker's latest progress line (vLLM logs its load steps), for the waiting message."""
    try:
        with log_file.open("rb") as handle:
            handle.seek(max(0, log_file.stat().st_size - 4096))
            lines = [line.strip() for line in handle.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "starting"
    useful = [line for line in lines if "WARNING" not in line and "Warning" not in line]
    return (useful or lines or ["starting"])[-1][-150:]


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--models", type=Path, default=DEMO_MODELS, help="models YAML (default: the demo model)")
        parser.add_argument(
            "--worker-spec",
            action="append",
            default=None,
            help=f"spec(s) the local worker serves (default: {DEMO_SPEC}); 'none' for no worker",
        )
        parser.add_argument("--no-flower", action="store_true", help="do not start Flower")
        parser.add_argument(
            "--no-trainer",
            action="store_true",
            help="do not start the CPU training worker (fine-tuning and eval-loss jobs, train.cpu)",
        )
        parser.add_argument("--api-workers", type=int, default=1, help="uvicorn worker processes (default 1)")
        parser.add_argument("--startup-timeout", type=float, default=600.0)

    def handle(self, *args: Any, **options: Any) -> None:
        self.children: list[tuple[str, subprocess.Popen]] = []
        logs = env.FARM_HOME / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        child_env = dict(
            os.environ, REDIS_URL=env.REDIS_URL, FARM_MODEL_DIR=str(env.FARM_MODEL_DIR), PYTHONUNBUFFERED="1"
        )
        # Workers fetch job inputs and LoRA adapters through the API (gpu_workers/envs.py).
        child_env.setdefault("FARM_API_URL", f"http://{env.FARM_HOST}:{env.FARM_PORT}")
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        # Also where SIGINT came in ignored (a script's `runfarm &`), which Python would otherwise keep: `kill -INT`
        # then stopped nothing.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            if not env.REDIS_URL_IS_SET:
                self.children.append(
                    (
                        "redis",
                        start_embedded_redis(
                            port=env.FARM_EMBEDDED_REDIS_PORT,
                            data_dir=env.FARM_HOME / "redis",
                            log_file=logs / "redis.log",
                        ),
                    )
                )
            self.step("migrating the database")
            call_command("migrate", interactive=False, verbosity=0)
            specs = options["worker_spec"] or [DEMO_SPEC]
            if specs == ["none"]:
                specs = []
            if options["models"] == DEMO_MODELS and specs:
                self.step(f"preparing the demo model in {env.FARM_MODEL_DIR} (first run: about a minute)")
                subprocess.run(
                    [sys.executable, "-m", "gpu_workers.model_store", "prepare-demo", str(env.FARM_MODEL_DIR)],
                    check=True,
                    env=child_env,
                )
            call_command("loadmodels", str(options["models"]), verbosity=0)
            spec_catalog_publish()
            key = self.bootstrap_key()
            self.step("starting the control worker, the API, Flower and the worker")
            self.spawn(
                "control",
                processes.control_worker_command(beat_schedule=str(env.FARM_HOME / "celerybeat-schedule")),
                logs,
                child_env,
            )
            self.spawn(
                "api",
                processes.api_command(host=env.FARM_HOST, port=env.FARM_PORT, workers=options["api_workers"]),
                logs,
                child_env,
            )
            if not options["no_flower"]:
                self.spawn(
                    "flower",
                    processes.flower_command(
                        broker_url=env.REDIS_URL, port=env.FLOWER_PORT, basic_auth=env.FLOWER_BASIC_AUTH
                    ),
                    logs,
                    child_env,
                )
            if specs:
                self.spawn(
                    "worker", processes.gpu_worker_command(specs=specs, worker_id="local-cpu-0"), logs, child_env
                )
            if not options["no_trainer"]:
                self.spawn(
                    "trainer",
                    processes.training_worker_command(classes=["cpu"], worker_id="local-trainer-0"),
                    logs,
                    child_env,
                )
            self.wait_ready(specs, options["startup_timeout"], logs)
            self.banner(key, logs)
            self.supervise()
        except KeyboardInterrupt:
            self.stdout.write("\nstopping the farm…")
        except subprocess.CalledProcessError as exc:
            raise CommandError(f"a preparation step failed: {exc}") from exc
        finally:
            self.stop_all()

    def step(self, text: str) -> None:
        self.stdout.write(f"==> {text}")
        self.stdout.flush()

    def spawn(self, name: str, command: list[str], logs: Path, child_env: dict[str, str]) -> None:
        log_file = (logs / f"{name}.log").open("ab")
        process = processes.spawn_child(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=child_env, cwd=env.BASE_DIR
        )
        self.children.append((name, process))

    def bootstrap_key(self) -> str:
        user_model = get_user_model()
        user, _ = user_model.objects.get_or_create(username="farm")
        if not user_model.objects.filter(is_superuser=True).exists():
            password = secrets.token_urlsafe(12)
            user_model.objects.create_superuser("admin", password=password)
            self.stdout.write(f"admin login (shown once): admin / {password}")
        raw = env.FARM_BOOTSTRAP_API_KEY
        if raw and api_key_find(raw) is not None:
            return raw
        _, raw = api_key_create(owner=user, name="bootstrap", raw_key=raw)
        return raw

    def check_children(self) -> None:
        for name, process in self.children:
            if process.poll() is not None:
                raise CommandError(f"{name} exited with code {process.returncode}; see {env.FARM_HOME}/logs/{name}.log")

    def wait_ready(self, specs: list[str], timeout_s: float, logs: Path) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://{env.FARM_HOST}:{env.FARM_PORT}/readyz"
        self.step(f"waiting for the API at {url} and for worker(s) to load {', '.join(specs) or 'nothing'}")
        last_note = 0.0
        while time.monotonic() < deadline:
            self.check_children()
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    api_ok = response.status == 200
            except OSError:
                api_ok = False
            served = {spec for worker in live_workers_sync()[0] for spec in worker.specs}
            if api_ok and set(specs) <= served:
                return
            if time.monotonic() - last_note > 15:
                last_note = time.monotonic()
                waiting = "the API" if not api_ok else "the worker"
                self.stdout.write(f"    … waiting for {waiting}: {_last_line(logs / 'worker.log')}")
            time.sleep(0.5)
        raise CommandError(f"the farm did not become ready in {timeout_s:.0f}s; see logs in {logs}")

    def banner(self, key: str, logs: Path) -> None:
        base = f"http://{env.FARM_HOST}:{env.FARM_PORT}"
        self.stdout.write(self.style.SUCCESS("\nfarm is up."))
        self.stdout.write(
            f"  OpenAI API:  {base}/v1      admin: {base}/admin/      flower: http://127.0.0.1:{env.FLOWER_PORT}/"
        )
        self.stdout.write(f"  API key:     {key}")
        self.stdout.write(f"  logs:        {logs}/")
        self.stdout.write(
            "  try:\n"
            f"    curl -s {base}/v1/chat/completions -H 'Authorization: Bearer {key}' "
            "-H 'Content-Type: application/json' \\\n"
            f'      -d \'{{"model": "{DEMO_MODEL}", "messages": [{{"role": "user", '
            '"content": "What is the capital of France?"}]}\''
        )
        self.stdout.write("  Ctrl-C stops everything.")
        self.stdout.flush()

    def supervise(self) -> None:
        while True:
            self.check_children()
            time.sleep(1.0)

    def stop_all(self) -> None:
        """Workers first (they hand work back), Redis last (it persists what they leave)."""
        others = [process for name, process in self.children if name != "redis"]
        embedded = [process for name, process in self.children if name == "redis"]
        for group in (others, embedded):
            for process in group:
                if process.poll() is None:
                    process.terminate()
            for process in group:
                self._wait(process)

    @staticmethod
    def _wait(process: subprocess.Popen) -> None:
        """Waits for a child, then kills what is left of its process group (a vLLM engine core and its worker
        outlive a parent killed mid-load)."""
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
