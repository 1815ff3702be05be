"""Runs training and eval-loss jobs on a training worker (`python -m gpu_workers --train <class>`).

One job attempt: claim it, fetch its inputs through the API (job token), run `gpu_workers.training` in a CHILD
process in its own process group, forward its progress lines as job events, upload the adapter, report the outcome.
A cancel (pub/sub), the job's deadline or a shutdown hand-back SIGKILLs the child's whole group at once, so a stop is
hard and immediate whatever the child is doing; a crash of the child fails (and retries) the attempt, never the
worker. Workers never touch the database: events go to the control plane as Celery messages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from farm import queues, redis_keys
from farm.processes import spawn_child
from farm.redis_client import redis_connect
from gpu_workers.job_api import JobApi, pack_directory, unpack_archive
from gpu_workers.job_events import JobEventPublisher
from gpu_workers.model_store import model_path

log = logging.getLogger(__name__)

CLAIM_TTL_S = 7 * 24 * 3600


@dataclass(frozen=True)
class TrainingMessage:
    """The task's JSON payload, as published by `farm.fine_tuning.training_publish`."""

    job_id: str
    attempt: int
    kind: str  # fine_tune | eval_loss
    deadline: float
    token: str
    base_source: str
    inputs: dict[str, str | None]
    init_adapter: bool
    spec: dict[str, Any]

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> TrainingMessage:
        return cls(**{name: kwargs[name] for name in cls.__dataclass_fields__})


@dataclass
class Outcome:
    kind: str  # succeeded | failed | timed_out | canceled | requeue
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Run:
    attempt: int
    process: subprocess.Popen | None = None
    stop_reason: str | None = None  # canceled | deadline | handback


class TrainingRunner:
    def __init__(
        self,
        *,
        worker_id: str,
        redis_url: str,
        events: JobEventPublisher,
        api_url: str,
        model_dir: Path,
        work_dir: Path,
        progress_every_s: float = 1.0,
    ) -> None:
        self.worker_id = worker_id
        self.redis = redis_connect(redis_url)
        self.events = events
        self.api_url = api_url
        self.model_dir = model_dir
        self.work_dir = work_dir
        self.progress_every_s = progress_every_s
        self.status = "ready"  # ready | draining
        self.completed = 0
        self.failed = 0
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()

    # --- lifecycle --------------------------------------------------------------------------------------------------

    def running_jobs(self) -> list[str]:
        with self._lock:
            return list(self._runs)

    def stop_job(self, job_id: str, reason: str) -> bool:
        """SIGKILLs the job's child process group (thread-safe); True if the job runs here."""
        with self._lock:
            run = self._runs.get(job_id)
            if run is None:
                return False
            run.stop_reason = run.stop_reason or reason
            process = run.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it just exited by itself
                os.killpg(process.pid, signal.SIGKILL)
            log.info("job %s: training process group %d killed (%s)", job_id, process.pid, reason)
        return True

    def drain(self, grace_s: float) -> None:
        """Stops taking work; jobs still running after `grace_s` are killed and handed back to the queue."""
        self.status = "draining"

        def hand_back() -> None:
            deadline = time.monotonic() + grace_s
            while self.running_jobs() and time.monotonic() < deadline:
                time.sleep(0.1)
            for job_id in self.running_jobs():
                self.stop_job(job_id, "handback")

        threading.Thread(target=hand_back, name="drain", daemon=True).start()

    def listen_for_cancellations(self) -> threading.Thread:
        """A thread that kills a canceled job's child as soon as the control plane announces the cancel."""

        def listen() -> None:
            while True:
                try:
                    pubsub = self.redis.pubsub()
                    pubsub.subscribe(redis_keys.CANCEL_CHANNEL)
                    for message in pubsub.listen():
                        if message["type"] == "message" and self.stop_job(message["data"].decode(), "canceled"):
                            log.info("job %s canceled: training stopped", message["data"].decode())
                except redis.RedisError as exc:  # Redis restart: resubscribe
                    log.warning("cancel listener lost Redis (%s); resubscribing", exc)
                    time.sleep(1.0)

        thread = threading.Thread(target=listen, name="cancel-listener", daemon=True)
        thread.start()
        return thread

    # --- one attempt ------------------------------------------------------------------------------------------------

    def run(self, message: TrainingMessage) -> Outcome | None:
        """Runs one attempt to an outcome and reports it; None for a duplicate delivery."""
        key = redis_keys.job_claim(message.job_id, message.attempt)
        if not self.redis.set(key, self.worker_id, nx=True, ex=CLAIM_TTL_S):
            log.info("job %s attempt %d already claimed: duplicate delivery ignored", message.job_id, message.attempt)
            return None
        send = self.events.send
        if self.redis.exists(redis_keys.job_cancel(message.job_id)):
            return Outcome("canceled")
        if self.status != "ready":
            send(job_id=message.job_id, attempt=message.attempt, kind="requeue", reason=f"worker {self.status}")
            return Outcome("requeue")
        if message.deadline <= time.time():
            outcome = Outcome(
                "timed_out",
                {"error": {"code": "deadline_exceeded", "message": "The job expired before it could start."}},
            )
            send(job_id=message.job_id, attempt=message.attempt, kind=outcome.kind, **outcome.detail)
            return outcome
        with self._lock:
            self._runs[message.job_id] = _Run(attempt=message.attempt)
        send(job_id=message.job_id, attempt=message.attempt, kind="running")
        workdir = self.work_dir / f"{message.job_id}-{message.attempt}"
        outcome = Outcome(
            "failed", {"error": {"code": "worker_error", "message": "training worker error", "retry": True}}
        )
        try:
            outcome = self._run(message, workdir)
        except Exception as exc:  # input download, upload, disk: transient; the control plane retries the attempt
            log.exception("job %s attempt %d failed on the worker", message.job_id, message.attempt)
            outcome = Outcome(
                "failed",
                {"error": {"code": "worker_error", "retry": True, "message": f"{exc.__class__.__name__}: {exc}"}},
            )
        finally:
            with self._lock:
                run = self._runs.pop(message.job_id, None)
            if run is not None and run.stop_reason == "canceled":
                outcome = Outcome("canceled")
            shutil.rmtree(workdir, ignore_errors=True)
            if outcome.kind == "succeeded":
                self.completed += 1
            elif outcome.kind == "failed":
                self.failed += 1
            if outcome.kind == "requeue":
                send(job_id=message.job_id, attempt=message.attempt, kind="requeue", reason="worker shutting down")
            elif outcome.kind != "canceled":  # a cancel was recorded by whoever canceled
                send(job_id=message.job_id, attempt=message.attempt, kind=outcome.kind, **outcome.detail)
        return outcome

    def _prepare(self, message: TrainingMessage, workdir: Path, api: JobApi) -> Path:
        """Downloads the inputs and writes the child's spec; returns the spec's path."""
        workdir.mkdir(parents=True, exist_ok=True)
        data = api.input_file(message.inputs["data"], workdir / "data.jsonl")
        validation = None
        if message.inputs.get("validation"):
            validation = api.input_file(message.inputs["validation"], workdir / "validation.jsonl")
        init_adapter = None
        if message.init_adapter:
            init_adapter = unpack_archive(api.adapter_tar(workdir / "init-adapter.tar"), workdir / "init-adapter")
        spec = {
            **message.spec,
            "mode": message.kind,
            "base_model_path": str(model_path(self.model_dir, message.base_source)),
            "data_path": str(data),
            "validation_path": str(validation) if validation else None,
            "init_adapter_path": str(init_adapter) if init_adapter else None,
            "output_dir": str(workdir / "out"),
        }
        path = workdir / "spec.json"
        path.write_text(json.dumps(spec))
        return path

    def _run(self, message: TrainingMessage, workdir: Path) -> Outcome:
        api = JobApi(base_url=self.api_url, token=message.token, job_id=message.job_id)
        spec_path = self._prepare(message, workdir, api)
        stderr_path = workdir / "stderr.log"
        with stderr_path.open("wb") as stderr:
            process = spawn_child(
                [sys.executable, "-m", "gpu_workers.training", str(spec_path)],
                stdout=subprocess.PIPE,
                stderr=stderr,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"},
            )
        with self._lock:
            run = self._runs[message.job_id]
            run.process = process
            stop_early = run.stop_reason
        if stop_early:  # canceled or handed back while the inputs were downloading
            self.stop_job(message.job_id, stop_early)
        limit_s = min(message.deadline - time.time(), queues.TRAIN_TASK.time_limit_s or float("inf"))
        timer = threading.Timer(max(0.0, limit_s), self.stop_job, args=(message.job_id, "deadline"))
        timer.daemon = True
        timer.start()
        try:
            result, error = self._forward_progress(message, process)
            returncode = process.wait()
        finally:
            timer.cancel()
        reason = run.stop_reason
        if reason == "canceled":
            return Outcome("canceled")
        if reason == "handback":
            return Outcome("requeue")
        if reason == "deadline":
            return Outcome(
                "timed_out",
                {"error": {"code": "deadline_exceeded", "message": "The job did not finish before its time limit."}},
            )
        if returncode == 0 and result is not None:
            return self._succeeded(message, api, result, workdir)
        if error is not None:  # the child rejected the data: retrying cannot help
            return Outcome(
                "failed",
                {
                    "error": {
                        "code": error.get("code", "training_error"),
                        "retry": False,
                        "message": error.get("message", ""),
                    }
                },
            )
        tail = stderr_path.read_text(errors="replace")[-1500:] if stderr_path.exists() else ""
        return Outcome(
            "failed",
            {
                "error": {
                    "code": "training_crashed",
                    "retry": True,
                    "message": f"training process exited with {returncode}: {tail}",
                }
            },
        )

    def _forward_progress(self, message: TrainingMessage, process: subprocess.Popen) -> tuple[dict | None, dict | None]:
        """Turns the child's stdout lines into job events (progress at most every `progress_every_s`, plus the
        first and last step; every checkpoint). Returns its result and error lines."""
        result = error = None
        last_sent = 0.0
        assert process.stdout is not None
        for raw in process.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            kind = line.pop("type", "")
            if kind == "progress":
                now = time.monotonic()
                edge = line.get("step") in (1, line.get("total_steps"))
                if edge or now - last_sent >= self.progress_every_s:
                    last_sent = now
                    self.events.send(job_id=message.job_id, attempt=message.attempt, kind="progress", **line)
            elif kind == "checkpoint":
                self.events.send(job_id=message.job_id, attempt=message.attempt, kind="checkpoint", **line)
            elif kind == "result":
                result = line
            elif kind == "error":
                error = line
        return result, error

    def _succeeded(self, message: TrainingMessage, api: JobApi, result: dict[str, Any], workdir: Path) -> Outcome:
        if message.kind != "fine_tune":
            return Outcome("succeeded", {"result": result})
        adapter_dir = Path(result.pop("adapter_dir"))
        archive = pack_directory(adapter_dir, workdir / "adapter.tar")
        uploaded = api.upload_artifact("adapter", archive)
        log.info(
            "job %s: adapter uploaded as %s (%d bytes)", message.job_id, uploaded.get("file_id"), archive.stat().st_size
        )
        return Outcome(
            "succeeded",
            {
                "result": {**result, "adapter_file_id": uploaded.get("file_id")},
                "usage": {"trained_tokens": result.get("trained_tokens", 0)},
            },
        )


_current: TrainingRunner | None = None


def install(runner: TrainingRunner) -> None:
    global _current
    _current = runner


def current() -> TrainingRunner:
    if _current is None:
        raise RuntimeError("no training runner: start training workers with `python -m gpu_workers --train CLASS`")
    return _current
