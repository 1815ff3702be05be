"""SQLite's terminal-state trigger as a migration operation (see 0003 and 0009)."""

from django.db import migrations

TERMINAL = "('succeeded', 'failed', 'canceled', 'timed_out')"
SQLITE_UP = f"""
CREATE TRIGGER farm_job_terminal_is_final BEFORE UPDATE OF status ON farm_job
WHEN OLD.status IN {TERMINAL} AND NEW.status <> OLD.status
BEGIN SELECT RAISE(ABORT, 'job is in a terminal state'); END;
"""
SQLITE_DOWN = "DROP TRIGGER IF EXISTS farm_job_terminal_is_final;"


def _forward(apps, schema_editor):
    if schema_editor.connection.vendor == "sqlite":
        schema_editor.execute(SQLITE_DOWN)
        schema_editor.execute(SQLITE_UP)


def _backward(apps, schema_editor):
    pass  # the trigger stays: 0003 owns it


def sqlite_trigger() -> migrations.RunPython:
    """(Re)creates the trigger on SQLite; a no-op elsewhere."""
    return migrations.RunPython(_forward, _backward)
