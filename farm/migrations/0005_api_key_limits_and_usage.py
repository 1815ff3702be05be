# Per-key policy (allowed models, max_tokens cap, RPM/TPM limits, token quota, on-limit behaviour), the request id
# of a job, and per-(key, model, day) usage.

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("farm", "0004_worker_status_draining_quarantined"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AddField(
            model_name="apikey",
            name="allowed_models",
            field=models.JSONField(blank=True, default=list, help_text="Model names this key may use; empty = all."),
        ),
        migrations.AddField(
            model_name="apikey",
            name="max_tokens_cap",
            field=models.PositiveIntegerField(blank=True, help_text="Largest `max_tokens` accepted.", null=True),
        ),
        migrations.AddField(
            model_name="apikey",
            name="on_limit",
            field=models.CharField(
                choices=[("reject", "Reject (429)"), ("wait", "Wait, then 429")],
                default="reject",
                help_text="Over a limit: answer 429 at once, or wait (bounded) for room.",
                max_length=10,
            ),
        ),
        migrations.AddField(
            model_name="apikey",
            name="quota_period",
            field=models.CharField(choices=[("day", "Day"), ("month", "Month")], default="day", max_length=10),
        ),
        migrations.AddField(
            model_name="apikey",
            name="rpm_limit",
            field=models.PositiveIntegerField(
                blank=True, help_text="Requests per minute; empty = no limit.", null=True
            ),
        ),
        migrations.AddField(
            model_name="apikey",
            name="token_quota",
            field=models.PositiveBigIntegerField(blank=True, help_text="Tokens per quota period.", null=True),
        ),
        migrations.AddField(
            model_name="apikey",
            name="tpm_limit",
            field=models.PositiveIntegerField(blank=True, help_text="Tokens per minute; empty = no limit.", null=True),
        ),
        migrations.AddField(
            model_name="job",
            name="request_id",
            field=models.CharField(
                blank=True,
                db_index=True,
                help_text="`x-request-id` of the API request that created it (in worker logs too).",
                max_length=128,
            ),
        ),
        migrations.CreateModel(
            name="Usage",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                (
                    "model",
                    models.CharField(help_text="Public model name (kept if the model is deleted).", max_length=200),
                ),
                ("day", models.DateField()),
                ("requests", models.PositiveBigIntegerField(default=0)),
                ("prompt_tokens", models.PositiveBigIntegerField(default=0)),
                ("completion_tokens", models.PositiveBigIntegerField(default=0)),
                ("updated_at", models.DateTimeField(auto_now=True)),
                (
                    "api_key",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE, related_name="usage", to="farm.apikey"
                    ),
                ),
                (
                    "owner",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE, related_name="usage", to=settings.AUTH_USER_MODEL
                    ),
                ),
            ],
            options={
                "verbose_name_plural": "usage",
                "ordering": ["-day", "model"],
                "indexes": [
                    models.Index(fields=["owner", "day"], name="farm_usage_owner_i_c4a910_idx"),
                    models.Index(fields=["day"], name="farm_usage_day_0d2082_idx"),
                ],
                "constraints": [
                    models.UniqueConstraint(fields=("api_key", "model", "day"), name="usage_key_model_day_unique")
                ],
            },
        ),
    ]
