"""Start a farm worker: probe hardware, load the engines for its specs, consume `infer.<spec>` queues.

    python -m gpu_workers --spec smollm2-135m-instruct-cpu

The worker needs only REDIS_URL (broker + registry) and FARM_MODEL_DIR (weights). Spec definitions come from the
catalogue the control plane publishes to Redis, so a spec is configured once, in the admin or a YAML file.
One worker process per device: its Celery threads share one in-process vLLM engine per spec.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import orjson
import redis
from celery.signals import worker_shutting_down

from farm import queues, redis_keys
from farm.celery_app import create_celery_app
from gpu_workers import envs, runtime
from gpu_workers.engine import EngineConfig
from gpu_workers.engine_host import EngineHost
from gpu_workers.hardware import probe_hardware
from gpu_workers.heartbeat import Heartbeat
from gpu_workers.job_events import JobEventPublisher
from gpu_workers.model_store import model_path

log = logging.getLogger("gpu_workers")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gpu_workers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Environment: REDIS_URL, FARM_MODEL_DIR, FARM_WORKER_ID, FARM_WORKER_CONCURRENCY, FARM_HEARTBEAT_S, "
        "FARM_WORKER_TTL_S, FARM_CPU_KVCACHE_GIB (see gpu_workers/envs.py).",
    )
    parser.add_argument("--spec", action="append", required=True, metavar="NAME",
                        help="model spec to serve (repeat for several); must exist in the farm's catalogue")
    parser.add_argument("--concurrency", type=int, default=envs.FARM_WORKER_CONCURRENCY,
                        help="concurrent requests in flight (Celery threads sharing the engine; default %(default)s)")
    parser.add_argument("--worker-id", default=envs.FARM_WORKER_ID, help="registry id (default: host-pid)")
    parser.add_argument("--catalog-wait", type=float, default=120.0,
                        help="seconds to wait for the spec catalogue to appear in Redis (default %(default)s)")
    parser.add_argument("--no-nvml", action="store_true", help="skip NVML and advertise CPU capacity only")
    parser.add_argument("--loglevel", default="INFO")
    return parser.parse_args(argv)


def fetch_specs(client: redis.Redis, names: list[str], wait_s: float) -> dict[str, dict]:
    """Reads the specs' definitions from the catalogue, waiting for the control plane to publish them."""
    deadline = time.monotonic() + wait_s
    while True:
        raw = client.hmget(redis_keys.SPEC_CATALOG, names)
        missing = [name for name, value in zip(names, raw, strict=True) if value is None]
        if not missing:
            return {name: orjson.loads(value) for name, value in zip(names, raw, strict=True)}
        if time.monotonic() > deadline:
            raise SystemExit(f"spec(s) {', '.join(missing)} not in the catalogue: add them in the admin or with "
                             "`manage.py loadmodels`, and check that the control worker runs")
        log.info("waiting for spec(s) %s in the catalogue", ", ".join(missing))
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    hardware = probe_hardware(use_nvml=not args.no_nvml)
    log.info("worker %s on %s: %s, %d cores, %d GPU(s)", args.worker_id, hardware.hostname, hardware.kind,
             hardware.cpu_cores, len(hardware.gpus))
    client = redis.Redis.from_url(envs.REDIS_URL)
    specs = fetch_specs(client, args.spec, args.catalog_wait)

    host = EngineHost(redis_url=envs.REDIS_URL)
    for name, spec in specs.items():
        log.info("loading %s (%s) from %s", name, spec["engine"], spec["source"])
        host.load(EngineConfig(spec_name=name, model_path=model_path(envs.FARM_MODEL_DIR, spec["source"]),
                               engine=spec["engine"], engine_args=spec.get("engine_args") or {}))

    app = create_celery_app(broker_url=envs.REDIS_URL, main="farm-worker")
    app.conf.include = ["tasks.inference"]
    import tasks.inference  # noqa: F401  (registers the task on this app)

    worker_runtime = runtime.WorkerRuntime(
        worker_id=args.worker_id, redis_url=envs.REDIS_URL, host=host,
        events=JobEventPublisher(app, args.worker_id), quarantine_after=envs.FARM_QUARANTINE_AFTER,
    )
    runtime.install(worker_runtime)
    infer_queues = [queues.infer_queue(name) for name in specs]
    celery_hostname = f"{args.worker_id}@{hardware.hostname}"
    host.submit(worker_runtime.listen_for_cancellations())

    def stop_consuming() -> None:
        for queue in infer_queues:
            app.control.cancel_consumer(queue, destination=[celery_hostname])

    worker_runtime.on_quarantine = stop_consuming
    worker_shutting_down.connect(lambda **_: worker_runtime.drain(envs.FARM_SHUTDOWN_GRACE_S), weak=False)
    started_at = time.time()
    heartbeat = Heartbeat(
        client=client, worker_id=args.worker_id, interval_s=envs.FARM_HEARTBEAT_S, ttl_s=envs.FARM_WORKER_TTL_S,
        describe=lambda: {
            "hostname": hardware.hostname, "specs": list(specs), "queues": infer_queues,
            "status": worker_runtime.status, "running_jobs": worker_runtime.running_jobs(),
            "hardware": probe_hardware(use_nvml=not args.no_nvml).as_dict() if hardware.gpus else hardware.as_dict(),
            "load": {**worker_runtime.stats.snapshot(), "capacity": args.concurrency}, "started_at": started_at,
        },
    )
    heartbeat.start()
    try:
        worker = app.Worker(
            pool="threads", concurrency=args.concurrency, queues=infer_queues,
            hostname=celery_hostname, loglevel=args.loglevel.upper(),
            without_gossip=True, without_mingle=True,
        )
        worker.start()
        return worker.exitcode or 0
    finally:
        heartbeat.stop()
        host.close()


if __name__ == "__main__":
    sys.exit(main())
