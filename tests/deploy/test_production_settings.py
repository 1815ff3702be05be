"""`FARM_ENV=production`: what must be set, what is refused, what is on, and `manage.py check --deploy` clean.

Each case boots Django in a fresh subprocess with exactly the given environment, as a container would."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION = {
    "FARM_ENV": "production",
    "SECRET_KEY": secrets.token_urlsafe(50),
    "DATABASE_URL": "postgres://farm:secret@db.internal:5432/farm",
    "REDIS_URL": "redis://redis.internal:6379/0",
    "FLOWER_BASIC_AUTH": "admin:secret",
    "ALLOWED_HOSTS": "farm.example.com",
}
SHOW_SETTINGS = (
    "import json, django; django.setup(); from django.conf import settings as s; print(json.dumps({name: "
    "getattr(s, name, None) for name in ('DEBUG', 'ALLOWED_HOSTS', 'SESSION_COOKIE_SECURE', 'CSRF_COOKIE_SECURE', "
    "'SECURE_PROXY_SSL_HEADER', 'SECURE_HSTS_SECONDS', 'SECURE_HSTS_INCLUDE_SUBDOMAINS', 'SECURE_HSTS_PRELOAD', "
    "'SECURE_SSL_REDIRECT', 'SECURE_REDIRECT_EXEMPT', 'SESSION_COOKIE_HTTPONLY', 'X_FRAME_OPTIONS', "
    "'SECURE_CONTENT_TYPE_NOSNIFF', 'SILENCED_SYSTEM_CHECKS')}))"
)


def run(args: list[str], **changes: str | None) -> subprocess.CompletedProcess[str]:
    """Runs Python in ROOT with the production environment plus `changes` (None removes a variable)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FARM_", "DJANGO_")) and k not in PRODUCTION}
    env.update(PRODUCTION, DJANGO_SETTINGS_MODULE="settings.django")
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def settings_with(**changes: str | None) -> dict:
    result = run(["-c", SHOW_SETTINGS], **changes)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_check_deploy_is_clean() -> None:
    result = run(["manage.py", "check", "--deploy", "--fail-level", "WARNING"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_secure_defaults() -> None:
    values = settings_with()
    assert values["DEBUG"] is False
    assert values["ALLOWED_HOSTS"] == ["farm.example.com"]
    assert values["SESSION_COOKIE_SECURE"] is values["CSRF_COOKIE_SECURE"] is True
    assert values["SESSION_COOKIE_HTTPONLY"] is True
    assert values["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    assert values["SECURE_HSTS_SECONDS"] >= 31_536_000
    assert values["SECURE_HSTS_INCLUDE_SUBDOMAINS"] is values["SECURE_HSTS_PRELOAD"] is True
    assert values["SECURE_SSL_REDIRECT"] is True
    assert {r"^healthz$", r"^readyz$", r"^metrics$"} <= set(values["SECURE_REDIRECT_EXEMPT"])
    assert values["X_FRAME_OPTIONS"] == "DENY"
    assert values["SECURE_CONTENT_TYPE_NOSNIFF"] is True


def test_without_a_tls_proxy_forwarded_proto_is_not_trusted() -> None:
    assert settings_with(FARM_TLS_PROXY="0")["SECURE_PROXY_SSL_HEADER"] is None


def test_plain_http_inside_the_cluster_is_an_explicit_choice() -> None:
    values = settings_with(FARM_SSL_REDIRECT="0")
    assert values["SECURE_SSL_REDIRECT"] is False
    assert "security.W008" in values["SILENCED_SYSTEM_CHECKS"]
    assert "security.W008" not in settings_with()["SILENCED_SYSTEM_CHECKS"]
    result = run(["manage.py", "check", "--deploy", "--fail-level", "WARNING"], FARM_SSL_REDIRECT="0")
    assert result.returncode == 0, result.stdout + result.stderr


def test_development_is_unchanged() -> None:
    values = settings_with(
        FARM_ENV="development",
        ALLOWED_HOSTS=None,
        SECRET_KEY=None,
        DATABASE_URL=None,
        REDIS_URL=None,
        FLOWER_BASIC_AUTH=None,
    )
    assert values["DEBUG"] is True
    assert values["SECURE_SSL_REDIRECT"] is False and values["SECURE_HSTS_SECONDS"] == 0


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        pytest.param({"DEBUG": "1"}, "DEBUG", id="debug-on"),
        pytest.param({"DEBUG": "true"}, "DEBUG", id="debug-true"),
        pytest.param({"SECRET_KEY": None}, "SECRET_KEY", id="no-secret-key"),
        pytest.param({"SECRET_KEY": "short"}, "SECRET_KEY", id="weak-secret-key"),
        pytest.param({"DATABASE_URL": None}, "DATABASE_URL", id="no-database"),
        pytest.param({"REDIS_URL": None}, "REDIS_URL", id="no-broker"),
        pytest.param({"FLOWER_BASIC_AUTH": None}, "FLOWER_BASIC_AUTH", id="no-flower-auth"),
        pytest.param({"ALLOWED_HOSTS": None}, "ALLOWED_HOSTS", id="no-allowed-hosts"),
        pytest.param({"DEBUG": "maybe"}, "DEBUG", id="debug-not-a-boolean"),
    ],
)
def test_unsafe_production_config_fails_at_boot_naming_the_variable(changes: dict[str, str | None], named: str) -> None:
    result = run(["manage.py", "check"], **changes)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert named in result.stderr.strip().splitlines()[-1]
