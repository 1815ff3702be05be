"""Fine-tuned models belong to the user whose job made them (only that user's keys see and use them)."""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


def owners_from_jobs(apps, schema_editor) -> None:
    """Fine-tuned models made before this migration get the owner of the fine-tuning job that produced them."""
    Model = apps.get_model("farm", "Model")
    Job = apps.get_model("farm", "Job")
    for model in Model.objects.filter(base__isnull=False, owner__isnull=True):
        job = Job.objects.filter(kind="fine_tune", status="succeeded", result__fine_tuned_model=model.name).first()
        if job is not None:
            Model.objects.filter(pk=model.pk).update(owner_id=job.owner_id)


class Migration(migrations.Migration):
    dependencies = [
        ("farm", "0009_terminal_trigger_again_on_sqlite"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AddField(
            model_name="model",
            name="owner",
            field=models.ForeignKey(
                blank=True,
                help_text="Set for a fine-tuned model: only this user's keys see and use it. Empty: every key (the "
                "farm's own models).",
                null=True,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="private_models",
                to=settings.AUTH_USER_MODEL,
            ),
        ),
        migrations.RunPython(owners_from_jobs, migrations.RunPython.noop),
    ]
