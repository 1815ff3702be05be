"""Builds a Celery app from the queue table. Import-light: GPU workers use it without Django or settings."""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_ready

from farm import queues
from farm.garbage_collection import freeze_startup


def is_redis_url(url: str) -> bool:
    """Whether a broker URL names Redis (kombu's Redis transport), not another broker such as RabbitMQ."""
    return url.split("://", 1)[0] in ("redis", "rediss")


def create_celery_app(*, broker_url: str, main: str = "farm", reap_every_s: float = 10.0) -> Celery:
    """One configuration for every farm process: JSON only, late acks, prefetch 1, no result backend."""
    app = Celery(main, broker=broker_url)
    if is_redis_url(broker_url):
        from farm.broker_transport import REDIS_TRANSPORT

        app.conf.broker_transport = REDIS_TRANSPORT  # survives a broker restart (see the module)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=queues.CONTROL_QUEUE,
        task_routes=queues.celery_task_routes(),
        task_create_missing_queues=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # Unacked messages of a dead worker come back after this; the reaper (farm.jobs) acts much sooner.
            "visibility_timeout": 3600,
            "socket_keepalive": True,
            "health_check_interval": 10,
        },
        broker_pool_limit=64,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=False,
        beat_schedule={
            name: {"task": task, "schedule": cadence, "options": {"expires": cadence * 0.9}}
            for name, (task, cadence) in queues.beat_schedule(reap_every_s=reap_every_s).items()
        },
        timezone="UTC",
    )
    from farm.request_ids import celery_carry_request_ids

    celery_carry_request_ids()  # a job's x-request-id reaches its worker's log lines
    worker_ready.connect(_freeze_startup, weak=False, dispatch_uid="farm-gc-freeze")
    return app


def _freeze_startup(sender: object = None, **_: object) -> None:
    """A worker is consuming: what it loaded to get here stays out of full collections (farm.garbage_collection)."""
    freeze_startup(f"celery worker {getattr(sender, 'hostname', '')}")
