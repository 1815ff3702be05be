"""The one table of queues, task names, routes and per-task policy.

Import-light on purpose (no Django, no Celery): the Celery app, the workers, the API and `deploy/` all read it.
Nothing else spells a queue name or a task name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CONTROL_QUEUE = "control"
INFER_PREFIX = "infer."
TRAIN_PREFIX = "train."
WORKER_PREFIX = "worker."

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")


def infer_queue(spec_name: str) -> str:
    """The queue that carries inference for one model spec."""
    return INFER_PREFIX + spec_name


def train_queue(hardware_class: str) -> str:
    """The queue that carries training and other long jobs for one hardware class (`cpu`, `gpu-80gb`...)."""
    return TRAIN_PREFIX + hardware_class


def worker_queue(worker_id: str) -> str:
    """A queue only one worker consumes. The Celery consumer of a worker that takes its inference messages itself
    (`gpu_workers.queue_consumer`) pops only this one, so it always has a queue to pop. Nothing is published to it
    today."""
    return WORKER_PREFIX + worker_id


def is_valid_name(name: str) -> bool:
    """Spec names and hardware classes become queue names: lowercase, digits, `.`, `_`, `-`."""
    return bool(_NAME_RE.match(name))


@dataclass(frozen=True)
class TaskPolicy:
    """How one task is delivered: its dotted name, queue family and time/retry limits."""

    name: str
    soft_time_limit_s: float | None
    time_limit_s: float | None
    max_retries: int


# Explicit dotted names: a rename of a Python function never orphans queued messages.
INFER_TASK = TaskPolicy("farm.infer.generate", soft_time_limit_s=None, time_limit_s=None, max_retries=0)
JOB_EVENT_TASK = TaskPolicy("farm.control.job_event", soft_time_limit_s=30, time_limit_s=60, max_retries=10)
# Workers send their events coalesced (gpu_workers.job_events); `job_event` applies one (a retried poison event).
JOB_EVENTS_TASK = TaskPolicy("farm.control.job_events", soft_time_limit_s=60, time_limit_s=120, max_retries=10)
REAP_TASK = TaskPolicy("farm.control.reap", soft_time_limit_s=50, time_limit_s=60, max_retries=0)
EXPIRE_TASK = TaskPolicy("farm.control.expire_jobs", soft_time_limit_s=240, time_limit_s=300, max_retries=0)
# Training and eval-loss on `train.<hardware-class>`. Workers run it in a child process and kill it (SIGKILL of its
# group) at the job's deadline, capped by `time_limit_s`; Celery's own limits need the prefork pool, which training
# workers do not use. Retries are the job's attempts (farm.jobs), not Celery's.
TRAIN_TASK = TaskPolicy("farm.train.run", soft_time_limit_s=None, time_limit_s=7 * 24 * 3600.0, max_retries=0)
# Advances one batch (validate, top up its in-flight window, collect outcomes, finalize); the reap kicks every active
# one (FARM_REAP_EVERY_S): lost kicks, expiry, lines waiting for a worker.
BATCH_TICK_TASK = TaskPolicy("farm.control.batch_tick", soft_time_limit_s=540, time_limit_s=600, max_retries=3)

# Tasks the control worker consumes: they always go to the control queue.
# Fills the shared model directory ahead of demand (copy, GGUF conversion, hub download): `farm.model_cache`.
MODEL_CACHE_TASK = TaskPolicy(
    "farm.control.model_cache", soft_time_limit_s=3 * 3600, time_limit_s=3 * 3600 + 60, max_retries=0
)

CONTROL_TASKS = (
    JOB_EVENT_TASK,
    JOB_EVENTS_TASK,
    REAP_TASK,
    EXPIRE_TASK,
    BATCH_TICK_TASK,
    MODEL_CACHE_TASK,
)


def beat_schedule(*, reap_every_s: float) -> dict[str, tuple[str, float]]:
    """name -> (task, cadence seconds). Each entry expires before its next run, so missed runs never pile up."""
    return {
        "reap-and-sweep": (REAP_TASK.name, reap_every_s),
        "expire-finished-jobs": (EXPIRE_TASK.name, 3600.0),
    }


def celery_task_routes() -> dict[str, dict[str, str]]:
    """Routes for tasks with a fixed queue; inference is published with an explicit `infer.<spec>` queue."""
    return {task.name: {"queue": CONTROL_QUEUE} for task in CONTROL_TASKS}
