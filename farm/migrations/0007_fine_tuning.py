# Fine-tuning and eval-loss jobs, job dependencies, fine-tuned models (base + LoRA adapter) (issue 6).

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("farm", "0006_files_and_batches"),
    ]

    operations = [
        migrations.AddField(
            model_name="job",
            name="depends_on",
            field=models.ManyToManyField(
                blank=True,
                help_text="Jobs that must succeed before this one starts (farm.jobs).",
                related_name="dependents",
                to="farm.job",
            ),
        ),
        migrations.AddField(
            model_name="model",
            name="adapter_file_id",
            field=models.CharField(blank=True, help_text="File id of its LoRA adapter (tar).", max_length=40),
        ),
        migrations.AddField(
            model_name="model",
            name="base",
            field=models.ForeignKey(
                blank=True,
                help_text="For a fine-tuned model: the model whose specs serve it.",
                null=True,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="fine_tunes",
                to="farm.model",
            ),
        ),
        migrations.AlterField(
            model_name="job",
            name="kind",
            field=models.CharField(
                choices=[
                    ("chat.completion", "Chat"),
                    ("text_completion", "Completion"),
                    ("fine_tune", "Fine Tune"),
                    ("eval_loss", "Eval Loss"),
                ],
                max_length=40,
            ),
        ),
    ]
