"""Fine-tuning and eval-loss jobs: validation, placement, creation, the worker's message, artifacts, completion.

Both are `Job`s (kinds `fine_tune` and `eval_loss`), so the state machine, reaper, cancel, deadlines and
dependencies of `farm.jobs` apply unchanged. They run on `train.<hardware-class>` queues (`farm.training_placement`
picks the class) in a child process of a training worker (`gpu_workers.training_runner`), which downloads the inputs
and uploads the adapter through the API with a job-scoped token (`farm.job_tokens`). A succeeded fine-tune
registers `<base>:ft-<id>`: a `Model` served by its base's specs plus the adapter (LoRA in vLLM).
"""

from __future__ import annotations

import json
import logging
import struct
import uuid
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from farm import jobs, queues, training_placement
from farm.dispatch import PUBLISH_RETRY_POLICY
from farm.errors import InvalidRequest, ModelNotFound, NotFound
from farm.files import file_create, file_get
from farm.job_tokens import JobGrant, job_token_mint
from farm.models import File, FilePurpose, Job, JobEvent, JobKind, JobStatus, Model, models_visible_to
from settings import env

log = logging.getLogger(__name__)

JOB_ID_PREFIX = "ftjob-"
ADAPTER_ARTIFACT = "adapter"
# A training attempt that dies is retried once: a second crash is more likely the data or the model than the host.
TRAINING_MAX_ATTEMPTS = 2


# --- ids and hyperparameters ------------------------------------------------------------------------------------


def job_public_id(job: Job) -> str:
    return f"{JOB_ID_PREFIX}{job.pk.hex}" if job.kind == JobKind.FINE_TUNE else str(job.pk)


def job_id_parse(value: str, *, param: str = "fine_tuning_job_id") -> str:
    """`ftjob-<hex>` or a plain job UUID -> the job's primary key; 404 when it is neither."""
    raw = value.removeprefix(JOB_ID_PREFIX)
    try:
        return str(uuid.UUID(raw))
    except (ValueError, AttributeError):
        raise NotFound(f"No job with id {value}.", param=param, code="job_not_found") from None


def fine_tuned_model_name(*, base: str, job_id: str) -> str:
    return f"{base}:ft-{uuid.UUID(job_id).hex[:12]}"


@dataclass(frozen=True)
class Hyperparameters:
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    lora_rank: int
    lora_alpha: int
    lora_dropout: float
    max_seq_len: int
    max_steps: int | None


# name -> (type, min, max, default or "auto" rule). Farm extensions (lora_*, max_*) ride in `hyperparameters`.
_LIMITS: dict[str, tuple[type, float, float]] = {
    "n_epochs": (int, 1, 50),
    "batch_size": (int, 1, 256),
    "learning_rate_multiplier": (float, 1e-6, 100.0),
    "lora_rank": (int, 1, 64),
    "lora_alpha": (int, 1, 1024),
    "lora_dropout": (float, 0.0, 0.9),
    "max_seq_len": (int, 16, 32768),
    "max_steps": (int, 1, 1_000_000),
}


def _auto(name: str, examples: int) -> Any:
    if name == "n_epochs":
        return 3 if examples >= 100 else max(1, min(10, 300 // max(examples, 1)))
    if name == "batch_size":
        return max(1, min(8, examples // 10 or 1))
    return {
        "learning_rate_multiplier": 1.0,
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "max_seq_len": 1024,
        "max_steps": None,
    }[name]


def hyperparameters_resolve(raw: dict[str, Any] | None, *, examples: int) -> Hyperparameters:
    """Checks and completes hyperparameters up front (400 naming the bad one); `"auto"` or absent -> a default."""
    raw = dict(raw or {})
    unknown = sorted(set(raw) - set(_LIMITS))
    if unknown:
        raise InvalidRequest(
            f"Unrecognized hyperparameter: {unknown[0]}.",
            param=f"hyperparameters.{unknown[0]}",
            code="unknown_parameter",
        )
    values: dict[str, Any] = {}
    for name, (kind, low, high) in _LIMITS.items():
        value = raw.get(name, "auto")
        param = f"hyperparameters.{name}"
        if value == "auto" or value is None:
            values[name] = _auto(name, examples)
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and value != int(value)):
            raise InvalidRequest(
                f"Invalid value for '{param}': expected {'an integer' if kind is int else 'a number'} or \"auto\".",
                param=param,
                code="invalid_value",
            )
        if not low <= value <= high:
            raise InvalidRequest(
                f"Invalid value for '{param}': must be between {low:g} and {high:g}.", param=param, code="invalid_value"
            )
        values[name] = kind(value)
    return Hyperparameters(**values)


# --- placement ----------------------------------------------------------------------------------------------------


def _model_dir(source: str) -> Path:
    path = Path(source).expanduser()
    return path if path.is_absolute() else env.FARM_MODEL_DIR / path


def _safetensors_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length))


def model_size_read(source: str) -> training_placement.ModelSize | None:
    """The base model's size from its safetensors headers (or config.json); None when the control plane cannot
    read its directory (weights only on the workers' volume)."""
    directory = _model_dir(source)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    try:
        headers = [_safetensors_header(p) for p in sorted(directory.glob("*.safetensors"))]
    except (OSError, ValueError, struct.error):
        headers = []
    if headers:
        return training_placement.size_from_safetensors_headers(headers, config)
    try:
        return training_placement.size_from_config(config)
    except (KeyError, ValueError, TypeError):
        return None


def training_hardware_class(*, base: Model, lora_rank: int) -> tuple[str, int | None]:
    """(hardware class, estimated bytes) for LoRA-training `base`: CPU when all its specs are CPU specs."""
    specs = list(base.specs.filter(enabled=True))
    cpu_only = bool(specs) and all(s.engine == "vllm-cpu" or s.resource_profile.startswith("cpu") for s in specs)
    size = model_size_read(base.source or (specs[0].source if specs else ""))
    if size is None:
        log.warning("model %s: size unknown (directory not readable here); training on cpu", base.name)
        return training_placement.CPU_CLASS, None
    need = training_placement.lora_training_bytes(size, rank=lora_rank)
    classes = training_placement.parse_hardware_classes(env.FARM_TRAIN_CLASSES)
    return training_placement.choose_hardware_class(need_bytes=need, classes=classes, cpu_only=cpu_only), need


# --- creation -------------------------------------------------------------------------------------------------------


def _input_file(*, file_id: str, owner_id: int, param: str) -> File:
    try:
        file = file_get(file_id=file_id, owner_id=owner_id)
    except NotFound:
        raise NotFound(f"No such File object: {file_id}", param=param, code="file_not_found") from None
    if file.purpose != FilePurpose.FINE_TUNE:
        raise InvalidRequest(
            f"File {file_id} has purpose {file.purpose!r}; upload it with purpose 'fine-tune'.",
            param=param,
            code="invalid_file_purpose",
        )
    return file


def _dependencies(depends_on: list[str] | None, owner_id: int) -> list[Job]:
    found = []
    for value in depends_on or []:
        if not isinstance(value, str):
            raise InvalidRequest("depends_on must be a list of job ids.", param="depends_on", code="invalid_value")
        job = Job.objects.filter(pk=job_id_parse(value, param="depends_on"), owner_id=owner_id).first()
        if job is None:
            raise NotFound(f"depends_on: no job with id {value}.", param="depends_on", code="job_not_found")
        found.append(job)
    return found


@dataclass(frozen=True)
class _Target:
    """What a training job runs on: the model row it names, the base whose weights load, and where an initial
    adapter comes from (a fine-tuned model's, or the one a dependency will produce)."""

    model: Model
    base: Model
    adapter_file_id: str | None = None
    adapter_from_job: str | None = None


def _resolve_target(name: str, dependencies: list[Job], owner_id: int) -> _Target:
    model = Model.objects.filter(models_visible_to(owner_id), name=name, enabled=True).select_related("base").first()
    if model is not None:
        if model.base_id is not None:
            return _Target(model=model, base=model.base, adapter_file_id=model.adapter_file_id)
        return _Target(model=model, base=model)
    for dependency in dependencies:  # a second stage names the model its first stage will produce
        if dependency.kind == JobKind.FINE_TUNE and dependency.model is not None:
            base = dependency.model.base or dependency.model
            if name == fine_tuned_model_name(base=base.name, job_id=str(dependency.pk)):
                return _Target(model=base, base=base, adapter_from_job=str(dependency.pk))
    raise ModelNotFound(f"The model `{name}` does not exist or you do not have access to it.", param="model")


def _training_job_create(
    *,
    owner_id: int,
    api_key_id: int | None,
    kind: str,
    target: _Target,
    request: dict[str, Any],
    dependencies: list[Job],
    lora_rank: int,
) -> Job:
    hardware_class, need = training_hardware_class(base=target.base, lora_rank=lora_rank)
    request = {
        **request,
        "base_model": target.base.name,
        "base_source": target.base.source,
        "hardware_class": hardware_class,
        "estimated_bytes": need,
        "init_adapter_file": target.adapter_file_id,
        "init_adapter_from_job": target.adapter_from_job,
    }
    with transaction.atomic():
        job = jobs.job_create(
            owner_id=owner_id,
            api_key_id=api_key_id,
            kind=kind,
            model_id=target.model.pk,
            spec_id=None,
            request=request,
            deadline_at=timezone.now() + timedelta(seconds=env.FARM_TRAIN_TIMEOUT_S),
            depends_on=[str(d.pk) for d in dependencies],
            max_attempts=TRAINING_MAX_ATTEMPTS,
        )
        JobEvent.objects.create(
            job=job,
            kind="created",
            attempt=1,
            worker_id="api",
            detail={"hardware_class": hardware_class, "estimated_bytes": need},
        )
        job_id = str(job.pk)
        # Published after commit; one that waits on others is held back by `job_dispatch` until they succeed
        # (checked here too, since a dependency may have finished before this commit).
        transaction.on_commit(lambda: jobs.job_dispatch(job_id=job_id))
    return job


def fine_tune_create(
    *,
    owner_id: int,
    api_key_id: int | None,
    model: str,
    training_file: str,
    validation_file: str | None = None,
    hyperparameters: dict[str, Any] | None = None,
    suffix: str | None = None,
    seed: int | None = None,
    metadata: dict[str, str] | None = None,
    depends_on: list[str] | None = None,
) -> Job:
    """Validates everything a fine-tune needs (files, hyperparameters, model, dependencies) and queues it."""
    training = _input_file(file_id=training_file, owner_id=owner_id, param="training_file")
    validation = (
        _input_file(file_id=validation_file, owner_id=owner_id, param="validation_file") if validation_file else None
    )
    params = hyperparameters_resolve(hyperparameters, examples=training.lines)
    if suffix is not None and (len(suffix) > 64 or not all(c.isalnum() or c in "-_" for c in suffix)):
        raise InvalidRequest("suffix: up to 64 letters, digits, '-' or '_'.", param="suffix", code="invalid_value")
    dependencies = _dependencies(depends_on, owner_id)
    target = _resolve_target(model, dependencies, owner_id)
    request = {
        "model": model,
        "training_file": training.pk,
        "validation_file": validation.pk if validation else None,
        "hyperparameters": asdict(params),
        "suffix": suffix,
        "seed": seed if seed is not None else 42,
        "metadata": metadata or {},
    }
    return _training_job_create(
        owner_id=owner_id,
        api_key_id=api_key_id,
        kind=JobKind.FINE_TUNE,
        target=target,
        request=request,
        dependencies=dependencies,
        lora_rank=params.lora_rank,
    )


def eval_loss_create(
    *,
    owner_id: int,
    api_key_id: int | None,
    model: str,
    file: str,
    batch_size: int = 8,
    max_seq_len: int = 1024,
    depends_on: list[str] | None = None,
) -> Job:
    """Queues a job computing the loss of `model` (a base or a fine-tuned model) on a `fine-tune` JSONL file."""
    data = _input_file(file_id=file, owner_id=owner_id, param="file")
    params = hyperparameters_resolve({"batch_size": batch_size, "max_seq_len": max_seq_len}, examples=data.lines)
    dependencies = _dependencies(depends_on, owner_id)
    target = _resolve_target(model, dependencies, owner_id)
    request = {"model": model, "file": data.pk, "batch_size": params.batch_size, "max_seq_len": params.max_seq_len}
    return _training_job_create(
        owner_id=owner_id,
        api_key_id=api_key_id,
        kind=JobKind.EVAL_LOSS,
        target=target,
        request=request,
        dependencies=dependencies,
        lora_rank=8,
    )


# --- the worker's message -------------------------------------------------------------------------------------------


def _resolve_init_adapter(job: Job) -> str | None:
    """The adapter a job starts from; a dependency's output is looked up now that it succeeded."""
    request = job.request
    if request.get("init_adapter_file"):
        return request["init_adapter_file"]
    from_job = request.get("init_adapter_from_job")
    if not from_job:
        return None
    result = Job.objects.filter(pk=from_job).values_list("result", flat=True).first() or {}
    file_id = result.get("adapter_file_id")
    if file_id:
        Job.objects.filter(pk=job.pk).update(request={**request, "init_adapter_file": file_id})
        job.request = {**request, "init_adapter_file": file_id}
    return file_id


def training_message(job: Job) -> dict[str, Any]:
    """The task kwargs for one attempt: what to run, where its inputs are, and the attempt's token."""
    request = job.request
    init_adapter = _resolve_init_adapter(job)
    if job.kind == JobKind.FINE_TUNE:
        params = request["hyperparameters"]
        spec = {"mode": "fine_tune", **params, "seed": request.get("seed") or 0}
        inputs = {"data": request["training_file"], "validation": request.get("validation_file")}
    else:
        spec = {"mode": "eval_loss", "batch_size": request["batch_size"], "max_seq_len": request["max_seq_len"]}
        inputs = {"data": request["file"], "validation": None}
    deadline = job.deadline_at.timestamp() if job.deadline_at else (timezone.now() + timedelta(days=1)).timestamp()
    return {
        "job_id": str(job.pk),
        "attempt": job.attempt,
        "kind": job.kind,
        "deadline": deadline,
        "token": job_token_mint(job_id=str(job.pk), attempt=job.attempt),
        "base_source": request["base_source"],
        "inputs": inputs,
        "init_adapter": bool(init_adapter),
        "spec": spec,
    }


def training_publish(*, job: Job, countdown: float = 0.0) -> None:
    """Sends the training task to `train.<hardware-class>` (after the job row is committed)."""
    from farm.celery import app

    app.send_task(
        queues.TRAIN_TASK.name,
        kwargs=training_message(job),
        queue=jobs.job_queue(job),
        countdown=countdown or None,
        retry=True,
        retry_policy=PUBLISH_RETRY_POLICY,
    )


# --- worker I/O (through the API, with the job's token) ---------------------------------------------------------------


def job_input_file(*, grant: JobGrant, file_id: str) -> File:
    """An input file of the granted job (its training, validation or eval file); 404 for any other."""
    request = grant.job.request
    allowed = {request.get("training_file"), request.get("validation_file"), request.get("file")} - {None}
    if grant.job.kind not in jobs.TRAINING_KINDS or file_id not in allowed:
        raise NotFound(f"File {file_id} is not an input of this job.", param="file_id", code="file_not_found")
    return file_get(file_id=file_id, owner_id=grant.job.owner_id)


def job_adapter_file(*, grant: JobGrant) -> File:
    """The LoRA adapter the granted job needs: its fine-tuned model's (inference, eval) or its starting one."""
    job = grant.job
    if job.kind in jobs.TRAINING_KINDS:
        file_id = _resolve_init_adapter(job)
    else:
        file_id = job.model.adapter_file_id if job.model is not None else None
    if not file_id:
        raise NotFound("This job uses no adapter.", code="adapter_not_found")
    return file_get(file_id=file_id, owner_id=None)


def job_artifact_store(*, grant: JobGrant, name: str, content: Any) -> File:
    """Stores an artifact a fine-tune attempt produced (its adapter, a tar) as a `fine-tune-results` file of the
    job's owner, and records it in the job's history (the success that follows must name this file)."""
    job = grant.job
    if job.kind != JobKind.FINE_TUNE or name != ADAPTER_ARTIFACT:
        raise InvalidRequest(f"This job takes no artifact named {name!r}.", param="name", code="invalid_artifact")
    if job.status != JobStatus.RUNNING:
        raise InvalidRequest("Artifacts are accepted while the attempt runs.", code="job_not_running")
    file = file_create(
        owner_id=job.owner_id,
        purpose=FilePurpose.FINE_TUNE_RESULTS,
        filename=f"{job_public_id(job)}-{name}.tar",
        content=content,
        validate=False,
    )
    JobEvent.objects.create(
        job=job,
        kind="artifact",
        attempt=grant.attempt,
        worker_id="api",
        detail={"name": name, "file_id": file.pk, "bytes": file.bytes},
    )
    return file


# --- completion -------------------------------------------------------------------------------------------------------


def fine_tune_finish(*, job_id: str, attempt: int, worker_id: str, detail: dict[str, Any]) -> bool:
    """A fine-tune attempt succeeded: registers `<base>:ft-<id>` on the adapter this attempt uploaded, in the
    same transaction as the job's success (no succeeded job without its model). No adapter -> the job fails."""
    with transaction.atomic():
        job = (
            Job.objects.select_for_update()
            .select_related("owner")
            .filter(pk=job_id, attempt=attempt, status__in=jobs.ACTIVE)
            .first()
        )
        if job is None:
            return jobs.job_transition(
                job_id=job_id, attempt=attempt, to=JobStatus.SUCCEEDED, worker_id=worker_id, detail=detail
            )  # logged no-op
        artifact = (
            JobEvent.objects.filter(job_id=job_id, attempt=attempt, kind="artifact", detail__name=ADAPTER_ARTIFACT)
            .order_by("-id")
            .first()
        )
        if artifact is None:
            error = {"code": "artifact_missing", "message": "the worker reported success without an adapter"}
            return jobs.job_transition(
                job_id=job_id, attempt=attempt, to=JobStatus.FAILED, worker_id=worker_id, detail={"error": error}
            )
        base = Model.objects.filter(name=job.request["base_model"]).first()
        if base is None:  # deleted while the job ran: nothing to serve the adapter on
            error = {"code": "base_model_gone", "message": f"the base model {job.request['base_model']} was deleted"}
            return jobs.job_transition(
                job_id=job_id, attempt=attempt, to=JobStatus.FAILED, worker_id=worker_id, detail={"error": error}
            )
        name = fine_tuned_model_name(base=base.name, job_id=job_id)
        file_id = artifact.detail["file_id"]
        Model.objects.update_or_create(
            name=name,
            defaults={
                "base": base,
                "source": base.source,
                "adapter_file_id": file_id,
                "enabled": True,
                "owner_id": job.owner_id,
                "owned_by": get_user_model().objects.filter(pk=job.owner_id).values_list("username", flat=True).first()
                or "user",
            },
        )
        result = {
            **(detail.get("result") or {}),
            "fine_tuned_model": name,
            "adapter_file_id": file_id,
            "result_files": [file_id],
        }
        return jobs.job_transition(
            job_id=job_id,
            attempt=attempt,
            to=JobStatus.SUCCEEDED,
            worker_id=worker_id,
            detail={**detail, "result": result},
        )
