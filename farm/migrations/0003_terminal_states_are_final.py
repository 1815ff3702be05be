"""Terminal job states can never be left: enforced by the database, not only by the guarded updates."""

from django.db import migrations

TERMINAL = "('succeeded', 'failed', 'canceled', 'timed_out')"

POSTGRES_UP = f"""
CREATE OR REPLACE FUNCTION farm_job_terminal_is_final() RETURNS trigger AS $$
BEGIN
    IF OLD.status IN {TERMINAL} AND NEW.status <> OLD.status THEN
        RAISE EXCEPTION 'job % is %, a terminal state', OLD.id, OLD.status;
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER farm_job_terminal_is_final BEFORE UPDATE OF status ON farm_job
    FOR EACH ROW EXECUTE FUNCTION farm_job_terminal_is_final();
"""
POSTGRES_DOWN = """
DROP TRIGGER IF EXISTS farm_job_terminal_is_final ON farm_job;
DROP FUNCTION IF EXISTS farm_job_terminal_is_final();
"""
SQLITE_UP = f"""
CREATE TRIGGER farm_job_terminal_is_final BEFORE UPDATE OF status ON farm_job
WHEN OLD.status IN {TERMINAL} AND NEW.status <> OLD.status
BEGIN SELECT RAISE(ABORT, 'job is in a terminal state'); END;
"""
SQLITE_DOWN = "DROP TRIGGER IF EXISTS farm_job_terminal_is_final;"


def forward(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(POSTGRES_UP, params=None)  # None: the `%` in RAISE is not a placeholder
    elif vendor == "sqlite":
        schema_editor.execute(SQLITE_UP)


def backward(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(POSTGRES_DOWN, params=None)
    elif vendor == "sqlite":
        schema_editor.execute(SQLITE_DOWN)


class Migration(migrations.Migration):
    dependencies = [("farm", "0002_job_dispatched_at")]
    operations = [migrations.RunPython(forward, backward)]
