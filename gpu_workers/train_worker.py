"""A training worker: consumes `train.<hardware-class>` queues and runs each job in a child process.

    python -m gpu_workers --train cpu [--train gpu-80gb ...]

It loads no engine; it needs REDIS_URL (broker, registry, cancels), FARM_API_URL (job inputs and artifacts, with
each job's token) and FARM_MODEL_DIR (base weights). It advertises itself in the live registry like an inference
worker (no specs; its running jobs), so the reaper requeues its jobs when it dies.
"""

from __future__ import annotations

import argparse
import logging
import time

from celery.signals import worker_shutting_down

from farm import queues
from farm.celery_app import create_celery_app
from farm.redis_client import redis_connect
from gpu_workers import envs, training_runner
from gpu_workers.exit_watchdog import exit_watchdog_start
from gpu_workers.hardware import probe_hardware
from gpu_workers.heartbeat import Heartbeat
from gpu_workers.job_events import JobEventPublisher

log = logging.getLogger("gpu_workers.train")


def run_training_worker(args: argparse.Namespace) -> int:
    hardware = probe_hardware(use_nvml=not args.no_nvml)
    classes = list(dict.fromkeys(args.train))
    bad = [name for name in classes if not queues.is_valid_name(name)]
    if bad:
        raise SystemExit(f"bad hardware class(es) {', '.join(bad)}: lowercase letters, digits, '.', '_', '-'")
    train_queues = [queues.train_queue(name) for name in classes]
    log.info(
        "training worker %s on %s (%s): %s", args.worker_id, hardware.hostname, hardware.kind, ", ".join(train_queues)
    )
    app = create_celery_app(broker_url=envs.REDIS_URL, main="farm-trainer")
    app.conf.include = ["tasks.training"]
    import tasks.training  # noqa: F401  (registers the task on this app)

    runner = training_runner.TrainingRunner(
        worker_id=args.worker_id,
        redis_url=envs.REDIS_URL,
        events=JobEventPublisher(app, args.worker_id),
        api_url=envs.FARM_API_URL,
        model_dir=envs.FARM_MODEL_DIR,
        work_dir=envs.FARM_TRAIN_WORK_DIR,
        progress_every_s=envs.FARM_TRAIN_PROGRESS_EVERY_S,
    )
    training_runner.install(runner)
    runner.listen_for_cancellations()
    worker_shutting_down.connect(lambda **_: runner.drain(envs.FARM_SHUTDOWN_GRACE_S), weak=False)
    concurrency = args.train_concurrency
    started_at = time.time()
    heartbeat = Heartbeat(
        client=redis_connect(envs.REDIS_URL),
        worker_id=args.worker_id,
        interval_s=envs.FARM_HEARTBEAT_S,
        ttl_s=envs.FARM_WORKER_TTL_S,
        describe=lambda: {
            "hostname": hardware.hostname,
            "specs": [],
            "queues": train_queues,
            "train_classes": classes,
            "status": runner.status,
            "running_jobs": runner.running_jobs(),
            "hardware": hardware.as_dict(),
            "load": {
                "running": len(runner.running_jobs()),
                "capacity": concurrency,
                "completed": runner.completed,
                "failed": runner.failed,
            },
            "started_at": started_at,
        },
    )
    heartbeat.start()
    try:
        worker = app.Worker(
            pool="threads",
            concurrency=concurrency,
            queues=train_queues,
            hostname=f"{args.worker_id}@{hardware.hostname}",
            loglevel=args.loglevel.upper(),
            without_gossip=True,
            without_mingle=True,
        )
        worker.start()
        exit_code = worker.exitcode or 0
    finally:
        runner.events.flush()  # the last outcomes and hand-backs leave before the process does
        heartbeat.stop()
    log.info("training worker %s shut down (exit %d)", args.worker_id, exit_code)
    exit_watchdog_start(exit_code, envs.FARM_EXIT_TIMEOUT_S)
    return exit_code
