"""The farm's persistent data: API keys, models and their specs, workers (registry mirror), jobs and job events.

Rows are written only by the services in this package (`farm.api_keys`, `farm.jobs`, `farm.catalog`,
`farm.workers`); views, tasks and the admin call those services.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q


class QuotaPeriod(models.TextChoices):
    DAY = "day"
    MONTH = "month"


class OnLimit(models.TextChoices):
    REJECT = "reject", "Reject (429)"
    WAIT = "wait", "Wait, then 429"


class ApiKey(models.Model):
    """A client credential. Only a SHA-256 hash of the secret is stored; the full key is shown once at creation."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, blank=True)
    lookup_id = models.CharField(max_length=16, unique=True, help_text="Public id inside the key, used to find it.")
    prefix = models.CharField(max_length=32, help_text="Visible start of the key (safe to log).")
    secret_hash = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    # Per-key policy (farm.api_keys carries it in the cached KeyPrincipal; farm.rate_limits enforces it in Redis).
    allowed_models = models.JSONField(default=list, blank=True, help_text="Model names this key may use; empty = all.")
    max_tokens_cap = models.PositiveIntegerField(null=True, blank=True, help_text="Largest `max_tokens` accepted.")
    rpm_limit = models.PositiveIntegerField(null=True, blank=True, help_text="Requests per minute; empty = no limit.")
    tpm_limit = models.PositiveIntegerField(null=True, blank=True, help_text="Tokens per minute; empty = no limit.")
    token_quota = models.PositiveBigIntegerField(null=True, blank=True, help_text="Tokens per quota period.")
    quota_period = models.CharField(max_length=10, choices=QuotaPeriod.choices, default=QuotaPeriod.DAY)
    on_limit = models.CharField(
        max_length=10,
        choices=OnLimit.choices,
        default=OnLimit.REJECT,
        help_text="Over a limit: answer 429 at once, or wait (bounded) for room.",
    )

    class Meta:
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.owner})"


class Engine(models.TextChoices):
    VLLM = "vllm", "vLLM (GPU)"
    VLLM_CPU = "vllm-cpu", "vLLM (CPU)"


class Model(models.Model):
    """A public model name clients ask for. Its fields are defaults that each spec may override."""

    name = models.CharField(max_length=100, unique=True, help_text="What clients send as `model`.")
    source = models.CharField(max_length=500, blank=True, help_text="Default weights: a directory under the model dir.")
    engine_args = models.JSONField(default=dict, blank=True, help_text="Default vLLM engine arguments.")
    owned_by = models.CharField(max_length=100, default="farm")
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # A fine-tuned model (`<base>:ft-<id>`) is served by its base's specs plus a LoRA adapter (farm.fine_tuning).
    base = models.ForeignKey(
        "self",
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="fine_tunes",
        help_text="For a fine-tuned model: the model whose specs serve it.",
    )
    adapter_file_id = models.CharField(max_length=40, blank=True, help_text="File id of its LoRA adapter (tar).")
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="private_models",
        help_text="Set for a fine-tuned model: only this user's keys see and use it. "
        "Empty: every key (the farm's own models).",
    )

    def __str__(self) -> str:
        return self.name


def models_visible_to(owner_id: int | None) -> Q:
    """The farm's own models, and the private (fine-tuned) ones of `owner_id`."""
    return Q(owner__isnull=True) | Q(owner_id=owner_id)


class ModelSpec(models.Model):
    """One way to serve a model: engine + weights + engine args + resource profile. Its name is its queue suffix."""

    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="specs")
    name = models.SlugField(max_length=100, unique=True, help_text="Queue `infer.<name>`; never shown to clients.")
    engine = models.CharField(max_length=20, choices=Engine.choices, default=Engine.VLLM)
    source = models.CharField(max_length=500, blank=True, help_text="Overrides the model's source when set.")
    engine_args = models.JSONField(default=dict, blank=True, help_text="Merged over the model's engine args.")
    resource_profile = models.CharField(max_length=100, default="cpu", help_text="`cpu:4`, `gpu:A100-80GB x2`…")
    min_replicas = models.PositiveIntegerField(default=0)
    weight = models.PositiveIntegerField(default=100, help_text="Share of traffic; 0 = standby only.")
    enabled = models.BooleanField(default=True)

    def __str__(self) -> str:
        return f"{self.model.name}/{self.name}"


class Worker(models.Model):
    """Mirror of the live registry in Redis, kept by the control worker for the admin and history."""

    class Status(models.TextChoices):
        ONLINE = "online"
        DRAINING = "draining"
        QUARANTINED = "quarantined"
        OFFLINE = "offline"

    worker_id = models.CharField(max_length=200, unique=True)
    hostname = models.CharField(max_length=200, blank=True)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.ONLINE)
    specs = models.JSONField(default=list, blank=True)
    hardware = models.JSONField(default=dict, blank=True)
    load = models.JSONField(default=dict, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return self.worker_id


class JobStatus(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    TIMED_OUT = "timed_out"


TERMINAL_STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.TIMED_OUT)


class JobKind(models.TextChoices):
    CHAT = "chat.completion"
    COMPLETION = "text_completion"
    FINE_TUNE = "fine_tune"  # LoRA fine-tuning on a `train.<hardware-class>` queue (farm.fine_tuning)
    EVAL_LOSS = "eval_loss"  # loss of a model or adapter on an uploaded JSONL (same runner)


class Job(models.Model):
    """One unit of work. Moves through `JobStatus` only via the guarded updates in `farm.jobs`."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="jobs")
    api_key = models.ForeignKey(ApiKey, on_delete=models.SET_NULL, null=True, blank=True, related_name="jobs")
    kind = models.CharField(max_length=40, choices=JobKind.choices)
    model = models.ForeignKey(Model, on_delete=models.SET_NULL, null=True, blank=True, related_name="jobs")
    spec = models.ForeignKey(ModelSpec, on_delete=models.SET_NULL, null=True, blank=True, related_name="jobs")
    status = models.CharField(max_length=20, choices=JobStatus.choices, default=JobStatus.QUEUED, db_index=True)
    attempt = models.PositiveIntegerField(default=1)
    max_attempts = models.PositiveIntegerField(default=3)
    worker_id = models.CharField(max_length=200, blank=True)
    request = models.JSONField(default=dict)
    result = models.JSONField(null=True, blank=True)
    usage = models.JSONField(null=True, blank=True)
    error = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    deadline_at = models.DateTimeField(null=True, blank=True)
    dispatched_at = models.DateTimeField(null=True, blank=True, help_text="Last time its message was published.")
    depends_on = models.ManyToManyField(
        "self",
        symmetrical=False,
        related_name="dependents",
        blank=True,
        help_text="Jobs that must succeed before this one starts (farm.jobs).",
    )
    request_id = models.CharField(
        max_length=128,
        blank=True,
        db_index=True,
        help_text="`x-request-id` of the API request that created it (in worker logs too).",
    )

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["owner", "-created_at"])]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(status__in=[s.value for s in JobStatus]), name="job_status_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.id} ({self.status})"

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class JobEvent(models.Model):
    """Append-only history of a job: who did what, when (shown in the admin)."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="events")
    at = models.DateTimeField(auto_now_add=True)
    kind = models.CharField(max_length=40)
    attempt = models.PositiveIntegerField(default=1)
    worker_id = models.CharField(max_length=200, blank=True)
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["at", "id"]

    def __str__(self) -> str:
        return f"{self.job_id} {self.kind}"


# --- files and batches (issue 6) ------------------------------------------------------------------------------------


class FilePurpose(models.TextChoices):
    """OpenAI's purposes the farm accepts or produces. Uploads may use `fine-tune` and `batch` (validated JSONL)
    and `user_data` (any bytes); the `*_output` / `*-results` purposes are written by the farm itself."""

    FINE_TUNE = "fine-tune"
    FINE_TUNE_RESULTS = "fine-tune-results"
    BATCH = "batch"
    BATCH_OUTPUT = "batch_output"
    USER_DATA = "user_data"


class FileStatus(models.TextChoices):
    UPLOADED = "uploaded"
    PROCESSED = "processed"
    ERROR = "error"


def _file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


class File(models.Model):
    """An uploaded or farm-produced file. Its bytes live in the `files` storage (`STORAGES`) under `storage_name`;
    rows and bytes are written only by `farm.files`."""

    id = models.CharField(primary_key=True, max_length=40, default=_file_id, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="files")
    api_key = models.ForeignKey(ApiKey, on_delete=models.SET_NULL, null=True, blank=True, related_name="files")
    purpose = models.CharField(max_length=40, choices=FilePurpose.choices)
    filename = models.CharField(max_length=255)
    bytes = models.BigIntegerField()
    lines = models.PositiveIntegerField(default=0, help_text="JSONL lines (validated purposes only).")
    sha256 = models.CharField(max_length=64)
    storage_name = models.CharField(max_length=500, help_text="Name of the bytes in the `files` storage.")
    status = models.CharField(max_length=20, choices=FileStatus.choices, default=FileStatus.PROCESSED)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    expires_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["owner", "purpose", "-created_at"])]

    def __str__(self) -> str:
        return f"{self.id} {self.filename} ({self.purpose})"


class BatchStatus(models.TextChoices):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


BATCH_ACTIVE_STATUSES = (
    BatchStatus.VALIDATING,
    BatchStatus.IN_PROGRESS,
    BatchStatus.FINALIZING,
    BatchStatus.CANCELLING,
)


def _batch_id() -> str:
    return f"batch_{uuid.uuid4().hex[:24]}"


class Batch(models.Model):
    """An OpenAI batch: the lines of an input file run as inference jobs, results written to output/error files.
    Moved only by `farm.batches`."""

    id = models.CharField(primary_key=True, max_length=40, default=_batch_id, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="batches")
    api_key = models.ForeignKey(ApiKey, on_delete=models.SET_NULL, null=True, blank=True, related_name="batches")
    endpoint = models.CharField(max_length=100)
    input_file_id = models.CharField(max_length=40)
    completion_window = models.CharField(max_length=10, default="24h")
    status = models.CharField(max_length=20, choices=BatchStatus.choices, default=BatchStatus.VALIDATING, db_index=True)
    output_file_id = models.CharField(max_length=40, blank=True)
    error_file_id = models.CharField(max_length=40, blank=True)
    errors = models.JSONField(null=True, blank=True, help_text="Validation errors (OpenAI `errors` list).")
    metadata = models.JSONField(null=True, blank=True)
    total = models.PositiveIntegerField(default=0)
    completed = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    usage = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    in_progress_at = models.DateTimeField(null=True, blank=True)
    finalizing_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(null=True, blank=True)
    expired_at = models.DateTimeField(null=True, blank=True)
    cancelling_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "batches"
        indexes = [models.Index(fields=["owner", "-created_at"])]

    def __str__(self) -> str:
        return f"{self.id} ({self.status})"


class BatchLineStatus(models.TextChoices):
    PENDING = "pending"  # waiting for a slot in the batch's in-flight window
    SUBMITTED = "submitted"  # its job is queued or running
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"  # never ran or stopped: the batch was cancelled or expired


class BatchLine(models.Model):
    """One request line of a batch. Once it has an outcome it is never run again (resumability)."""

    batch = models.ForeignKey(Batch, on_delete=models.CASCADE, related_name="lines")
    index = models.PositiveIntegerField()
    custom_id = models.CharField(max_length=512)
    kind = models.CharField(max_length=40, help_text="Its job's kind (`JobKind`).")
    model = models.CharField(max_length=200)
    request = models.JSONField(default=dict, help_text="The job request the worker reads.")
    status = models.CharField(max_length=20, choices=BatchLineStatus.choices, default=BatchLineStatus.PENDING)
    job = models.OneToOneField(Job, on_delete=models.SET_NULL, null=True, blank=True, related_name="batch_line")
    response = models.JSONField(null=True, blank=True, help_text="OpenAI batch output `response` object.")
    error = models.JSONField(null=True, blank=True, help_text="OpenAI batch output `error` object.")

    class Meta:
        ordering = ["batch", "index"]
        constraints = [
            models.UniqueConstraint(fields=["batch", "index"], name="batch_line_index_unique"),
            models.UniqueConstraint(fields=["batch", "custom_id"], name="batch_line_custom_id_unique"),
        ]
        indexes = [models.Index(fields=["batch", "status", "index"])]

    def __str__(self) -> str:
        return f"{self.batch_id}#{self.index} {self.custom_id} ({self.status})"


class Usage(models.Model):
    """Tokens and requests per (key, model, UTC day), added to once per succeeded job by `farm.usage`."""

    api_key = models.ForeignKey(ApiKey, on_delete=models.CASCADE, related_name="usage")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="usage")
    model = models.CharField(max_length=200, help_text="Public model name (kept if the model is deleted).")
    day = models.DateField()
    requests = models.PositiveBigIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-day", "model"]
        verbose_name_plural = "usage"
        constraints = [models.UniqueConstraint(fields=["api_key", "model", "day"], name="usage_key_model_day_unique")]
        indexes = [models.Index(fields=["owner", "day"]), models.Index(fields=["day"])]

    def __str__(self) -> str:
        return f"{self.day} {self.model} key {self.api_key_id}: {self.requests} requests"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
