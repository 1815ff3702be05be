"""Puts back SQLite's terminal-state trigger (0003): SQLite has no ALTER for most column changes, so Django rebuilds
the table for them (0005, 0007 changed `farm_job`), and a rebuilt table has lost its triggers. PostgreSQL's trigger
survives ALTER TABLE and is left alone. A later migration that alters `farm_job` must end with `sqlite_trigger()`
again; `tests[masked]test_jobs.py::test_the_database_refuses_to_move_a_terminal_job` fails on SQLite otherwise."""

from django.db import migrations

from farm.migrations import _terminal_trigger


class Migration(migrations.Migration):
    dependencies = [("farm", "0008_fleet_and_routing")]
    operations = [_terminal_trigger.sqlite_trigger()]
