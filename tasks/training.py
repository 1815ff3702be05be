"""Training tasks, consumed by training workers from `train.<hardware-class>` queues."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from farm import queues


@shared_task(name=queues.TRAIN_TASK.name, acks_late=True, ignore_result=True)
def run(**payload: Any) -> None:
    """Runs one fine-tune or eval-loss attempt in a child process (see `gpu_workers.training_runner`)."""
    from gpu_workers import training_runner

    training_runner.current().run(training_runner.TrainingMessage.from_kwargs(payload))
