# Files and batches (issue 6).

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models

import farm.models


class Migration(migrations.Migration):
    dependencies = [
        ("farm", "0005_api_key_limits_and_usage"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name="File",
            fields=[
                (
                    "id",
                    models.CharField(
                        default=farm.models._file_id, editable=False, max_length=40, primary_key=True, serialize=False
                    ),
                ),
                (
                    "purpose",
                    models.CharField(
                        choices=[
                            ("fine-tune", "Fine Tune"),
                            ("fine-tune-results", "Fine Tune Results"),
                            ("batch", "Batch"),
                            ("batch_output", "Batch Output"),
                            ("user_data", "User Data"),
                        ],
                        max_length=40,
                    ),
                ),
                ("filename", models.CharField(max_length=255)),
                ("bytes", models.BigIntegerField()),
                ("lines", models.PositiveIntegerField(default=0, help_text="JSONL lines (validated purposes only).")),
                ("sha256", models.CharField(max_length=64)),
                (
                    "storage_name",
                    models.CharField(help_text="Name of the bytes in the `files` storage.", max_length=500),
                ),
                (
                    "status",
                    models.CharField(
                        choices=[("uploaded", "Uploaded"), ("processed", "Processed"), ("error", "Error")],
                        default="processed",
                        max_length=20,
                    ),
                ),
                ("created_at", models.DateTimeField(auto_now_add=True, db_index=True)),
                ("expires_at", models.DateTimeField(blank=True, null=True)),
                (
                    "api_key",
                    models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="files",
                        to="farm.apikey",
                    ),
                ),
                (
                    "owner",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE, related_name="files", to=settings.AUTH_USER_MODEL
                    ),
                ),
            ],
            options={
                "ordering": ["-created_at"],
                "indexes": [
                    models.Index(fields=["owner", "purpose", "-created_at"], name="farm_file_owner_i_ad9510_idx")
                ],
            },
        ),
        migrations.CreateModel(
            name="Batch",
            fields=[
                (
                    "id",
                    models.CharField(
                        default=farm.models._batch_id, editable=False, max_length=40, primary_key=True, serialize=False
                    ),
                ),
                ("endpoint", models.CharField(max_length=100)),
                ("input_file_id", models.CharField(max_length=40)),
                ("completion_window", models.CharField(default="24h", max_length=10)),
                (
                    "status",
                    models.CharField(
                        choices=[
                            ("validating", "Validating"),
                            ("failed", "Failed"),
                            ("in_progress", "In Progress"),
                            ("finalizing", "Finalizing"),
                            ("completed", "Completed"),
                            ("expired", "Expired"),
                            ("cancelling", "Cancelling"),
                            ("cancelled", "Cancelled"),
                        ],
                        db_index=True,
                        default="validating",
                        max_length=20,
                    ),
                ),
                ("output_file_id", models.CharField(blank=True, max_length=40)),
                ("error_file_id", models.CharField(blank=True, max_length=40)),
                (
                    "errors",
                    models.JSONField(blank=True, help_text="Validation errors (OpenAI `errors` list).", null=True),
                ),
                ("metadata", models.JSONField(blank=True, null=True)),
                ("total", models.PositiveIntegerField(default=0)),
                ("completed", models.PositiveIntegerField(default=0)),
                ("failed", models.PositiveIntegerField(default=0)),
                ("usage", models.JSONField(blank=True, null=True)),
                ("created_at", models.DateTimeField(auto_now_add=True, db_index=True)),
                ("expires_at", models.DateTimeField(blank=True, null=True)),
                ("in_progress_at", models.DateTimeField(blank=True, null=True)),
                ("finalizing_at", models.DateTimeField(blank=True, null=True)),
                ("completed_at", models.DateTimeField(blank=True, null=True)),
                ("failed_at", models.DateTimeField(blank=True, null=True)),
                ("expired_at", models.DateTimeField(blank=True, null=True)),
                ("cancelling_at", models.DateTimeField(blank=True, null=True)),
                ("cancelled_at", models.DateTimeField(blank=True, null=True)),
                (
                    "api_key",
                    models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="batches",
                        to="farm.apikey",
                    ),
                ),
                (
                    "owner",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE, related_name="batches", to=settings.AUTH_USER_MODEL
                    ),
                ),
            ],
            options={
                "verbose_name_plural": "batches",
                "ordering": ["-created_at"],
                "indexes": [models.Index(fields=["owner", "-created_at"], name="farm_batch_owner_i_4d0886_idx")],
            },
        ),
        migrations.CreateModel(
            name="BatchLine",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("index", models.PositiveIntegerField()),
                ("custom_id", models.CharField(max_length=512)),
                ("kind", models.CharField(help_text="Its job's kind (`JobKind`).", max_length=40)),
                ("model", models.CharField(max_length=200)),
                ("request", models.JSONField(default=dict, help_text="The job request the worker reads.")),
                (
                    "status",
                    models.CharField(
                        choices=[
                            ("pending", "Pending"),
                            ("submitted", "Submitted"),
                            ("succeeded", "Succeeded"),
                            ("failed", "Failed"),
                            ("cancelled", "Cancelled"),
                        ],
                        default="pending",
                        max_length=20,
                    ),
                ),
                (
                    "response",
                    models.JSONField(blank=True, help_text="OpenAI batch output `response` object.", null=True),
                ),
                ("error", models.JSONField(blank=True, help_text="OpenAI batch output `error` object.", null=True)),
                (
                    "batch",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE, related_name="lines", to="farm.batch"
                    ),
                ),
                (
                    "job",
                    models.OneToOneField(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="batch_line",
                        to="farm.job",
                    ),
                ),
            ],
            options={
                "ordering": ["batch", "index"],
                "indexes": [models.Index(fields=["batch", "status", "index"], name="farm_batchl_batch_i_28e798_idx")],
                "constraints": [
                    models.UniqueConstraint(fields=("batch", "index"), name="batch_line_index_unique"),
                    models.UniqueConstraint(fields=("batch", "custom_id"), name="batch_line_custom_id_unique"),
                ],
            },
        ),
    ]
