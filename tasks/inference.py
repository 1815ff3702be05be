"""Inference tasks, consumed by GPU/CPU workers from `infer.<spec>` queues."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from farm import queues


@shared_task(name=queues.INFER_TASK.name, acks_late=True, ignore_result=True)
def generate(**payload: Any) -> None:
    """Runs one inference job on this worker's shared engine (see `gpu_workers.runtime`)."""
    from gpu_workers import runtime
    from gpu_workers.inference import InferenceMessage

    runtime.current().run_inference(InferenceMessage.from_kwargs(payload))
