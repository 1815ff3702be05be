"""`/v1/fine_tuning/jobs` (create, list, retrieve, cancel, events, checkpoints) in OpenAI's object shapes, so the
`openai` SDK drives it; and `/v1/evals/loss` (farm), whose result is read with `GET /v1/jobs/{id}`.

Another key owner's job is a 404. The work itself is `farm.fine_tuning` (a `Job` of kind `fine_tune`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.decorators import api_view, parser_classes
from rest_framework.parsers import JSONParser
from rest_framework.request import Request
from rest_framework.response import Response

from api.body import validate
from api.openai.fine_tuning.schema import EvalLossCreate, FineTuningJobCreate
from api.openai.jobs.views import JobSerializer
from api.openai.pagination import list_page
from api.schema import error_responses
from farm.errors import InvalidRequest, NotFound
from farm.fine_tuning import eval_loss_create, fine_tune_create, job_id_parse, job_public_id
from farm.jobs import job_cancel
from farm.models import Job, JobEvent, JobKind, JobStatus

_STATUS = {
    JobStatus.QUEUED: "queued",
    JobStatus.RUNNING: "running",
    JobStatus.SUCCEEDED: "succeeded",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELED: "cancelled",
    JobStatus.TIMED_OUT: "failed",
}
_OPENAI_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value else None


def _owned_fine_tune(request: Request, fine_tuning_job_id: str) -> Job:
    job = (
        Job.objects.select_related("model")
        .prefetch_related("depends_on")
        .filter(pk=job_id_parse(fine_tuning_job_id), owner_id=request.auth.owner_id, kind=JobKind.FINE_TUNE)
        .first()
    )
    if job is None:
        raise NotFound(
            f"No fine-tuning job with id {fine_tuning_job_id}.",
            param="fine_tuning_job_id",
            code="fine_tuning_job_not_found",
        )
    return job


def fine_tuning_job_object(job: Job) -> dict[str, Any]:
    """OpenAI's `fine_tuning.job` object (plus the farm's `depends_on`, `hardware_class`, `lora` settings)."""
    request = job.request
    result = job.result or {}
    params = request.get("hyperparameters") or {}
    progress = JobEvent.objects.filter(job=job, kind="progress").order_by("-id").first()
    estimated_finish = None
    trained_tokens = result.get("trained_tokens")
    if job.status == JobStatus.RUNNING and progress is not None:
        estimated_finish = int(progress.at.timestamp() + float(progress.detail.get("eta_s") or 0))
        trained_tokens = progress.detail.get("trained_tokens")
    error = None
    if job.status in (JobStatus.FAILED, JobStatus.TIMED_OUT) and job.error:
        error = {
            "code": str(job.error.get("code") or "error"),
            "message": str(job.error.get("message") or ""),
            "param": None,
        }
    hyperparameters = {name: params.get(name) for name in _OPENAI_HYPERPARAMETERS}
    return {
        "id": job_public_id(job),
        "object": "fine_tuning.job",
        "created_at": _ts(job.created_at),
        "error": error,
        "fine_tuned_model": result.get("fine_tuned_model"),
        "finished_at": _ts(job.finished_at),
        "hyperparameters": hyperparameters,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        "model": request.get("model"),
        "organization_id": "org-farm",
        "result_files": result.get("result_files") or [],
        "seed": request.get("seed"),
        "status": _STATUS[job.status],
        "trained_tokens": trained_tokens,
        "training_file": request.get("training_file"),
        "validation_file": request.get("validation_file"),
        "estimated_finish": estimated_finish,
        "integrations": [],
        "metadata": request.get("metadata") or None,
        "user_provided_suffix": request.get("suffix"),
        "depends_on": [job_public_id(d) for d in job.depends_on.all()],
        "hardware_class": request.get("hardware_class"),
        "lora": {k: params.get(k) for k in ("lora_rank", "lora_alpha", "lora_dropout", "max_seq_len", "max_steps")},
    }


def _event_message(event: JobEvent) -> tuple[str, str, str]:
    """(level, message, type) of a job event in OpenAI's wording."""
    detail = event.detail or {}
    if event.kind == "progress":
        return (
            "info",
            f"Step {detail.get('step')}/{detail.get('total_steps')}: training loss={detail.get('train_loss')}",
            "metrics",
        )
    if event.kind == "checkpoint":
        return "info", f"Checkpoint created at step {detail.get('metrics', {}).get('step')}", "metrics"
    error = (detail.get("error") or {}).get("message", "")
    messages = {
        "created": ("info", f"Created fine-tuning job (hardware class {detail.get('hardware_class')})"),
        "running": ("info", "Fine-tuning job started"),
        "artifact": ("info", f"Uploaded {detail.get('name')} ({detail.get('bytes')} bytes) as {detail.get('file_id')}"),
        "requeued": ("warn", f"Attempt {event.attempt} stopped ({detail.get('reason')}); retrying"),
        JobStatus.SUCCEEDED: ("info", "The job has successfully completed"),
        JobStatus.FAILED: ("error", f"The job failed: {error}"),
        JobStatus.TIMED_OUT: ("error", f"The job failed: {error}"),
        JobStatus.CANCELED: ("info", "The job has been cancelled"),
    }
    level, message = messages.get(event.kind, ("info", event.kind))
    return level, message, "message"


def event_object(event: JobEvent) -> dict[str, Any]:
    """OpenAI's `fine_tuning.job.event`."""
    level, message, kind = _event_message(event)
    return {
        "id": f"ftevent-{event.pk}",
        "object": "fine_tuning.job.event",
        "created_at": _ts(event.at),
        "level": level,
        "message": message,
        "data": event.detail or {},
        "type": kind,
    }


def _limit(request: Request) -> int:
    try:
        return max(1, min(100, int(request.query_params.get("limit") or 20)))  # clamped, like /v1/jobs
    except ValueError:
        raise InvalidRequest(
            "limit must be an integer between 1 and 100.", param="limit", code="invalid_value"
        ) from None


def _page_params(request: Request, prefix: str) -> tuple[int, int | None]:
    """(limit, the event id `after` names): an `after` that is not one of this job's ids pages from the start."""
    after = request.query_params.get("after") or ""
    number = after.removeprefix(prefix)
    return _limit(request), int(number) if after.startswith(prefix) and number.isdigit() else None


def _list_page(items: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    return list_page(items[:limit], has_more=len(items) > limit)


_CREATE_DOC = (
    "OpenAI's body (`model`, `training_file`, `validation_file`, `hyperparameters` or "
    "`method.supervised.hyperparameters`, `suffix`, `seed`, `metadata`) plus the farm's `depends_on`."
)


@extend_schema(
    methods=["POST"],
    operation_id="createFineTuningJob",
    summary="Create a LoRA fine-tuning job",
    description=_CREATE_DOC,
    tags=["Fine-tuning"],
    request=FineTuningJobCreate,
    responses={200: OpenApiTypes.OBJECT, **error_responses(400, 401, 404, 503)},
)
@extend_schema(
    methods=["GET"],
    operation_id="listFineTuningJobs",
    summary="List your fine-tuning jobs",
    tags=["Fine-tuning"],
    parameters=[OpenApiParameter("limit", OpenApiTypes.INT), OpenApiParameter("after", OpenApiTypes.STR)],
    responses={200: OpenApiTypes.OBJECT, **error_responses(400, 401, 404, 503)},
)
@api_view(["GET", "POST"])
@parser_classes([JSONParser])
def fine_tuning_jobs_view(request: Request) -> Response:
    if request.method == "POST":
        body = validate(FineTuningJobCreate, request.data if isinstance(request.data, dict) else {})
        hyperparameters = body.hyperparameters.model_dump(exclude_none=True) if body.hyperparameters else {}
        if body.method is not None and body.method.supervised and body.method.supervised.hyperparameters:
            hyperparameters.update(body.method.supervised.hyperparameters.model_dump(exclude_none=True))
        job = fine_tune_create(
            owner_id=request.auth.owner_id,
            api_key_id=request.auth.key_id,
            model=body.model,
            training_file=body.training_file,
            validation_file=body.validation_file,
            hyperparameters=hyperparameters,
            suffix=body.suffix,
            seed=body.seed,
            metadata=body.metadata,
            depends_on=body.depends_on,
        )
        return Response(fine_tuning_job_object(job))
    limit = _limit(request)
    rows = (
        Job.objects.select_related("model")
        .prefetch_related("depends_on")
        .filter(owner_id=request.auth.owner_id, kind=JobKind.FINE_TUNE)
    )
    after = request.query_params.get("after")
    if after:
        anchor = rows.filter(pk=job_id_parse(after, param="after")).values("created_at").first()
        if anchor:  # an unknown `after` is a 404 (like OpenAI's); a deleted one pages from the start
            rows = rows.filter(created_at__lt=anchor["created_at"])
    return Response(_list_page([fine_tuning_job_object(j) for j in rows.order_by("-created_at")[: limit + 1]], limit))


@extend_schema(
    operation_id="retrieveFineTuningJob",
    summary="Retrieve a fine-tuning job",
    tags=["Fine-tuning"],
    responses={200: OpenApiTypes.OBJECT, **error_responses(401, 404, 503)},
)
@api_view(["GET"])
def fine_tuning_job_view(request: Request, fine_tuning_job_id: str) -> Response:
    return Response(fine_tuning_job_object(_owned_fine_tune(request, fine_tuning_job_id)))


@extend_schema(
    operation_id="cancelFineTuningJob",
    summary="Cancel a fine-tuning job (its training process is killed)",
    tags=["Fine-tuning"],
    request=None,
    responses={200: OpenApiTypes.OBJECT, **error_responses(401, 404, 409, 503)},
)
@api_view(["POST"])
def fine_tuning_job_cancel_view(request: Request, fine_tuning_job_id: str) -> Response:
    job = _owned_fine_tune(request, fine_tuning_job_id)
    job_cancel(job_id=str(job.pk), owner_id=request.auth.owner_id)
    return Response(fine_tuning_job_object(_owned_fine_tune(request, fine_tuning_job_id)))


@extend_schema(
    operation_id="listFineTuningEvents",
    summary="A fine-tuning job's events, newest first (step, loss, ETA in `data`)",
    tags=["Fine-tuning"],
    parameters=[OpenApiParameter("limit", OpenApiTypes.INT), OpenApiParameter("after", OpenApiTypes.STR)],
    responses={200: OpenApiTypes.OBJECT, **error_responses(400, 401, 404, 503)},
)
@api_view(["GET"])
def fine_tuning_events_view(request: Request, fine_tuning_job_id: str) -> Response:
    job = _owned_fine_tune(request, fine_tuning_job_id)
    limit, after = _page_params(request, "ftevent-")
    events = JobEvent.objects.filter(job=job).order_by("-id")
    if after is not None:
        events = events.filter(id__lt=after)
    return Response(_list_page([event_object(e) for e in events[: limit + 1]], limit))


@extend_schema(
    operation_id="listFineTuningCheckpoints",
    summary="A fine-tuning job's checkpoints (one per epoch)",
    tags=["Fine-tuning"],
    parameters=[OpenApiParameter("limit", OpenApiTypes.INT), OpenApiParameter("after", OpenApiTypes.STR)],
    responses={200: OpenApiTypes.OBJECT, **error_responses(400, 401, 404, 503)},
)
@api_view(["GET"])
def fine_tuning_checkpoints_view(request: Request, fine_tuning_job_id: str) -> Response:
    job = _owned_fine_tune(request, fine_tuning_job_id)
    limit, after = _page_params(request, "ftckpt-")
    events = JobEvent.objects.filter(job=job, kind="checkpoint", attempt=job.attempt).order_by("-id")
    if after is not None:
        events = events.filter(id__lt=after)
    name = (job.result or {}).get("fine_tuned_model") or job.request.get("model")
    data = []
    for event in events[: limit + 1]:
        metrics = dict(event.detail.get("metrics") or {})
        step = int(metrics.get("step") or 0)
        data.append(
            {
                "id": f"ftckpt-{event.pk}",
                "object": "fine_tuning.job.checkpoint",
                "created_at": _ts(event.at),
                "fine_tuned_model_checkpoint": f"{name}:ckpt-step-{step}",
                "fine_tuning_job_id": job_public_id(job),
                "metrics": {**metrics, "step": float(step)},
                "step_number": step,
            }
        )
    return Response(_list_page(data, limit))


@extend_schema(
    operation_id="createEvalLoss",
    summary="Queue an eval-loss job: a model's loss on a fine-tune file",
    description="Body: `model` (a base or `<base>:ft-<id>`), `file` (purpose fine-tune), `batch_size`, "
    "`max_seq_len`, `depends_on`. The result (`loss`, `perplexity`, `tokens`) is in `GET /v1/jobs/{id}`.",
    tags=["Jobs"],
    request=EvalLossCreate,
    responses={200: JobSerializer, **error_responses(400, 401, 404, 503)},
)
@api_view(["POST"])
@parser_classes([JSONParser])
def eval_loss_view(request: Request) -> Response:
    body = validate(EvalLossCreate, request.data if isinstance(request.data, dict) else {})
    job = eval_loss_create(
        owner_id=request.auth.owner_id,
        api_key_id=request.auth.key_id,
        model=body.model,
        file=body.file,
        batch_size=body.batch_size,
        max_seq_len=body.max_seq_len,
        depends_on=body.depends_on,
    )
    return Response(JobSerializer(job).data)
