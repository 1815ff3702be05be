"""The farm's persistent data: API keys, models and their specs, workers (registry mirror), jobs and job events.

Rows are written only by the services in this package (`farm.api_keys`, `farm.jobs`, `farm.catalog`,
`farm.workers`); views, tasks and the admin call those services.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models


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

    def __str__(self) -> str:
        return self.name


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
