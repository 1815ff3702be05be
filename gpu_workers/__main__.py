"""Start a farm worker: probe hardware, load the engines for its specs, consume `infer.<spec>` queues.

    python -m gpu_workers --spec smollm2-135m-instruct-cpu

    python -m gpu_workers --spec chat-cpu --lazy-spec coder-cpu --lazy-spec summarizer-cpu --memory-gib 6

`--lazy-spec` specs are advertised but loaded only on their first request (a cold start: the request waits for the
load); when a load needs memory that loaded specs hold, the least recently used idle ones are unloaded first. The
memory budget is the free VRAM (RAM on CPU hosts) at start unless `--memory-gib` sets it.

The worker needs only REDIS_URL (broker + registry) and FARM_MODEL_DIR (weights). Spec definitions come from the
catalogue the control plane publishes to Redis, so a spec is configured once, in the admin or a YAML file.
One worker process per device: its engine loop takes the messages (gpu_workers/queue_consumer.py) and every job
shares one in-process vLLM engine per spec.

    python -m gpu_workers --train cpu

A training worker instead: it consumes `train.<hardware-class>` queues (fine-tuning and eval-loss jobs, each run in
a child process) and loads no engine. It also needs FARM_API_URL: job inputs and adapters move through the API.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time

import orjson
import redis
from celery import Celery
from celery.signals import worker_shutting_down

from farm import queues, redis_keys
from farm.broker_transport import PASSIVE_QUEUES
from farm.celery_app import create_celery_app
from farm.redis_client import redis_connect
from farm.request_ids import logging_add_request_id
from gpu_workers import envs, runtime
from gpu_workers.engine import EngineConfig
from gpu_workers.engine_host import EngineHost
from gpu_workers.engine_pool import EnginePool, NoRoom, SpecLoadFailed
from gpu_workers.exit_watchdog import exit_watchdog_start
from gpu_workers.fit import spec_fit
from gpu_workers.hardware import HardwareReport, probe_hardware
from gpu_workers.heartbeat import Heartbeat, loaded_model_entries, queued_messages
from gpu_workers.job_events import JobEventPublisher
from gpu_workers.model_store import model_path
from gpu_workers.queue_consumer import QueueConsumer, has_blmpop

log = logging.getLogger("gpu_workers")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gpu_workers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Environment: REDIS_URL, FARM_MODEL_DIR, FARM_WORKER_ID, FARM_WORKER_CONCURRENCY, FARM_HEARTBEAT_S, "
        "FARM_WORKER_TTL_S, FARM_CPU_KVCACHE_GIB, FARM_API_URL, FARM_TRAIN_WORK_DIR, FARM_ADAPTER_DIR "
        "(see gpu_workers/envs.py).",
    )
    parser.add_argument(
        "--spec",
        action="append",
        default=[],
        metavar="NAME",
        help="model spec to load at start and serve (repeat for several); must exist in the farm's catalogue",
    )
    parser.add_argument(
        "--lazy-spec",
        action="append",
        default=[],
        metavar="NAME",
        help="model spec to serve, loaded on its first request (repeat for several)",
    )
    parser.add_argument(
        "--memory-gib",
        type=float,
        default=None,
        help="memory the engines may use, GiB (default: free VRAM, or RAM on a CPU host, at start); "
        "loads beyond it unload the least recently used idle spec",
    )
    parser.add_argument(
        "--train",
        action="append",
        metavar="CLASS",
        help="be a training worker for this hardware class instead (queue `train.CLASS`: `cpu`, "
        "`gpu-80gb`...; repeat for several); see FARM_TRAIN_CLASSES on the control plane",
    )
    parser.add_argument(
        "--train-concurrency",
        type=int,
        default=envs.FARM_TRAIN_CONCURRENCY,
        help="training jobs run at once, each in its own process (default %(default)s)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=envs.FARM_WORKER_CONCURRENCY,
        help="concurrent requests in flight, all sharing the engine (default %(default)s)",
    )
    parser.add_argument("--worker-id", default=envs.FARM_WORKER_ID, help="registry id (default: host-pid)")
    parser.add_argument(
        "--catalog-wait",
        type=float,
        default=120.0,
        help="seconds to wait for the spec catalogue to appear in Redis (default %(default)s)",
    )
    parser.add_argument("--no-nvml", action="store_true", help="skip NVML and advertise CPU capacity only")
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)
    if bool(args.spec or args.lazy_spec) == bool(args.train):
        parser.error("give --spec/--lazy-spec (serve models) or --train (run training jobs), not both")
    if overlap := set(args.spec) & set(args.lazy_spec):
        parser.error(f"{', '.join(sorted(overlap))}: give a spec as --spec or as --lazy-spec, not both")
    return args


def fetch_specs(client: redis.Redis, names: list[str], wait_s: float) -> dict[str, dict]:
    """Reads the specs' definitions from the catalogue, waiting for the control plane to publish them."""
    deadline = time.monotonic() + wait_s
    while True:
        raw = client.hmget(redis_keys.SPEC_CATALOG, names)
        missing = [name for name, value in zip(names, raw, strict=True) if value is None]
        if not missing:
            return {name: orjson.loads(value) for name, value in zip(names, raw, strict=True)}
        if time.monotonic() > deadline:
            raise SystemExit(
                f"spec(s) {', '.join(missing)} not in the catalogue: add them in the admin or with "
                "`manage.py loadmodels`, and check that the control worker runs"
            )
        log.info("waiting for spec(s) %s in the catalogue", ", ".join(missing))
        time.sleep(1.0)


def engine_pool_start(
    args: argparse.Namespace, specs: dict[str, dict], hardware: HardwareReport, host: EngineHost
) -> EnginePool:
    """Checks that every spec fits this worker's memory budget, loads the `--spec` ones, leaves the lazy ones."""
    need_bytes: dict[str, int] = {}
    free_bytes = 0
    for name, spec in specs.items():  # refuse a spec that does not fit before advertising anything (gpu_workers.fit)
        fit = spec_fit(
            name=name,
            spec=spec,
            source_path=model_path(envs.FARM_MODEL_DIR, spec["source"]),
            hardware=hardware,
            cpu_kv_cache_gib=float(envs.FARM_CPU_KVCACHE_GIB),
        )
        if not fit.fits:
            raise SystemExit(f"spec {name} does not fit this worker: {fit.reason}")
        log.info("%s fits: needs %.2f GiB of %.2f GiB", name, fit.need_bytes / 2**30, fit.free_bytes / 2**30)
        need_bytes[name], free_bytes = fit.need_bytes, max(free_bytes, fit.free_bytes)
    budget = int(args.memory_gib * 2**30) if args.memory_gib is not None else free_bytes
    if too_big := [name for name in specs if need_bytes[name] > budget]:
        raise SystemExit(f"spec(s) {', '.join(too_big)} need more than the {budget / 2**30:.2f} GiB budget")

    engines = EnginePool(
        configs={
            name: EngineConfig(
                spec_name=name,
                model_path=model_path(envs.FARM_MODEL_DIR, spec["source"]),
                engine=spec["engine"],
                engine_args=spec.get("engine_args") or {},
            )
            for name, spec in specs.items()
        },
        need_bytes=need_bytes,
        budget_bytes=budget,
        load=host.load,
        unload=lambda name, _: host.unload(name),
    )
    for name in args.spec:
        log.info("loading %s (%s) from %s", name, specs[name]["engine"], specs[name]["source"])
        try:
            engines.load_now(name)
        except (SpecLoadFailed, NoRoom) as exc:
            raise SystemExit(f"spec {name} could not be loaded: {exc}") from exc
    if args.lazy_spec:
        log.info("loaded on first request: %s (budget %.2f GiB)", ", ".join(args.lazy_spec), budget / 2**30)
    return engines


def consumption_start(
    args: argparse.Namespace,
    app: Celery,
    client: redis.Redis,
    worker_runtime: runtime.WorkerRuntime,
    celery_hostname: str,
) -> tuple[QueueConsumer | None, list[str]]:
    """Starts taking inference messages on the engine loop (`gpu_workers.queue_consumer`), unless the worker is
    told to use Celery's consumer or the broker lacks BLMPOP; wires quarantine, resume and the shutdown drain to
    whichever consumes. Returns the direct consumer (None: Celery's) and the queues Celery's consumer is to take."""
    infer_queues = [queues.infer_queue(name) for name in worker_runtime.engines.names()]
    direct = envs.FARM_WORKER_CONSUMER != "celery"
    if direct and not has_blmpop(client):
        log.warning("the broker has no BLMPOP (Redis < 7): inference messages go through Celery's consumer")
        direct = False

    def stop_consuming() -> None:
        for queue in infer_queues:
            app.control.cancel_consumer(queue, destination=[celery_hostname])

    def start_consuming() -> None:
        for queue in infer_queues:
            app.control.add_consumer(queue, destination=[celery_hostname])

    if not direct:
        worker_runtime.on_quarantine = stop_consuming
        worker_runtime.on_resume = start_consuming
        worker_shutting_down.connect(lambda **_: worker_runtime.drain(envs.FARM_SHUTDOWN_GRACE_S), weak=False)
        return None, infer_queues

    host = worker_runtime.host
    consumer = QueueConsumer(
        runtime=worker_runtime, client=host.redis, queue_names=infer_queues, concurrency=args.concurrency
    )

    async def start() -> None:
        consumer.start()

    host.run(start())
    # Celery's consumer still lists the queues (remote control, Flower) but leaves their messages to this one; its
    # view follows quarantine and resume, broadcast from a thread (the engine loop may be the caller).
    PASSIVE_QUEUES.update(infer_queues)

    def stop_taking() -> None:
        consumer.pause()
        threading.Thread(target=stop_consuming, name="cancel-consumer", daemon=True).start()

    def start_taking() -> None:
        consumer.resume()
        threading.Thread(target=start_consuming, name="add-consumer", daemon=True).start()

    worker_runtime.on_quarantine = stop_taking
    worker_runtime.on_resume = start_taking

    def shutting_down(**_: object) -> None:
        consumer.pause()
        worker_runtime.drain(envs.FARM_SHUTDOWN_GRACE_S)

    worker_shutting_down.connect(shutting_down, weak=False)
    log.info("taking inference messages from %s on the engine loop", ", ".join(infer_queues))
    return consumer, [*infer_queues, queues.worker_queue(args.worker_id)]


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging_add_request_id()  # lines written for a job carry its request's x-request-id
    # Celery's own two INFO lines per task ("Task ... received", "... succeeded in 0.01s: None") name only the task
    # id; `tasks.inference` logs each job's start and outcome with its job and request ids. Their failures still log.
    for name in ("celery.worker.strategy", "celery.app.trace"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging(args.loglevel)
    if args.train:
        from gpu_workers.train_worker import run_training_worker

        return run_training_worker(args)
    hardware = probe_hardware(use_nvml=not args.no_nvml)
    log.info(
        "worker %s on %s: %s, %d cores, %d GPU(s)",
        args.worker_id,
        hardware.hostname,
        hardware.kind,
        hardware.cpu_cores,
        len(hardware.gpus),
    )
    client = redis_connect(envs.REDIS_URL)
    specs = fetch_specs(client, [*args.spec, *args.lazy_spec], args.catalog_wait)

    host = EngineHost(redis_url=envs.REDIS_URL)
    engines = engine_pool_start(args, specs, hardware, host)

    app = create_celery_app(broker_url=envs.REDIS_URL, main="farm-worker")
    app.conf.update(include=["tasks.inference"], worker_send_task_events=envs.FARM_INFER_TASK_EVENTS)
    import tasks.inference  # noqa: F401  (registers the task on this app)

    worker_runtime = runtime.WorkerRuntime(
        worker_id=args.worker_id,
        redis_url=envs.REDIS_URL,
        host=host,
        events=JobEventPublisher(app, args.worker_id),
        quarantine_after=envs.FARM_QUARANTINE_AFTER,
        engines=engines,
    )
    runtime.install(worker_runtime)
    infer_queues = [queues.infer_queue(name) for name in specs]
    celery_hostname = f"{args.worker_id}@{hardware.hostname}"
    host.submit(worker_runtime.listen_for_cancellations())
    host.submit(worker_runtime.listen_for_control())
    consumer, celery_queues = consumption_start(args, app, client, worker_runtime, celery_hostname)
    started_at = time.time()
    model_entries = loaded_model_entries(specs, model_dir=envs.FARM_MODEL_DIR, loaded_at=started_at)

    def heartbeat_description() -> dict:
        """This worker's registry entry (also what its `/metrics` reports)."""
        loaded_since = engines.loaded_since()
        models = [
            {**entry, "loaded_at": loaded_since[entry["spec"]]}
            for entry in model_entries
            if entry["spec"] in loaded_since
        ]
        return {
            "hostname": hardware.hostname,
            "specs": list(loaded_since),
            "lazy_specs": engines.lazy(),
            "memory": engines.describe(),
            "queues": infer_queues,
            "status": worker_runtime.status,
            "running_jobs": worker_runtime.running_jobs(),
            "hardware": probe_hardware(use_nvml=not args.no_nvml).as_dict() if hardware.gpus else hardware.as_dict(),
            "load": {
                **worker_runtime.stats.snapshot(),
                "capacity": args.concurrency,
                "queued": queued_messages(client, infer_queues),
            },
            "models": models,
            "started_at": started_at,
        }

    heartbeat = Heartbeat(
        client=client,
        worker_id=args.worker_id,
        interval_s=envs.FARM_HEARTBEAT_S,
        ttl_s=envs.FARM_WORKER_TTL_S,
        describe=heartbeat_description,
    )
    heartbeat.start()
    if envs.FARM_WORKER_METRICS_PORT:
        from gpu_workers.metrics import start_metrics_server

        start_metrics_server(
            port=envs.FARM_WORKER_METRICS_PORT,
            addr=envs.FARM_WORKER_METRICS_ADDR,
            worker_id=args.worker_id,
            describe=heartbeat_description,
        )
        log.info("worker metrics on http://%s:%d/metrics", envs.FARM_WORKER_METRICS_ADDR, envs.FARM_WORKER_METRICS_PORT)
    try:
        worker = app.Worker(
            pool="threads",
            concurrency=args.concurrency if consumer is None else 2,  # with the direct consumer it runs no job
            queues=celery_queues,
            hostname=celery_hostname,
            loglevel=args.loglevel.upper(),
            without_gossip=True,
            without_mingle=True,
        )
        worker.start()
        exit_code = worker.exitcode or 0
    finally:
        if consumer is not None:  # Celery ran none of the jobs: wait here for the drain to end them
            worker_runtime.drain(envs.FARM_SHUTDOWN_GRACE_S)
            left = host.run(consumer.stop(envs.FARM_SHUTDOWN_GRACE_S + 5.0))
            if left:
                log.warning("%d jobs still running at exit: their messages come back to the queue", left)
        worker_runtime.events.flush()  # the last outcomes and hand-backs leave before the process does
        heartbeat.stop()
        host.close()
    log.info("worker %s shut down (exit %d)", args.worker_id, exit_code)
    exit_watchdog_start(exit_code, envs.FARM_EXIT_TIMEOUT_S)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
