# Reserved so parallel work on the schema stays one linear chain; operations are filled in by the change that needs them.

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("farm", "0007_fine_tuning"),
    ]

    operations = []
