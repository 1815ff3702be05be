"""Django settings for the control plane (API, admin, control worker). Values come from `settings.env`."""

from __future__ import annotations

import json
from typing import Any

import dj_database_url

from settings import env

BASE_DIR = env.BASE_DIR
SECRET_KEY = env.SECRET_KEY
DEBUG = env.DEBUG
ALLOWED_HOSTS = env.ALLOWED_HOSTS

INSTALLED_APPS = [
    "farm.admin_apps.FarmAdminConfig",  # django.contrib.admin with the farm site (cluster overview, usage)
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI / Redoc assets served by the farm itself: the docs work offline
    "farm",
]

# Django's stock middleware, as subclasses (`api.django_middleware`) that cost the token API (/v1/...) no thread
# hops: the header-only ones run on the event loop, the browser-session ones skip it.
MIDDLEWARE = [
    "api.django_middleware.SecurityMiddleware",
    # Static files (admin, API docs UI) from the app itself: uvicorn serves none. WhiteNoise, made async-capable.
    "api.middleware.StaticFilesMiddleware",
    "api.middleware.RequestIdMiddleware",
    "api.django_middleware.SessionMiddleware",
    "api.django_middleware.CommonMiddleware",
    "api.django_middleware.CsrfViewMiddleware",
    "api.django_middleware.AuthenticationMiddleware",
    "api.django_middleware.MessageMiddleware",
    "api.django_middleware.XFrameOptionsMiddleware",
    # Last, so it sees the view's exception first: OpenAI-shaped errors from plain views under /v1/ and /api/.
    "api.errors.ApiExceptionMiddleware",
]

# Django's deploy checks look for the stock security, clickjacking and CSRF middleware by dotted path; MIDDLEWARE holds
# subclasses of all three (tests/api/test_middleware.py keeps it so).
SILENCED_SYSTEM_CHECKS = ["security.W001", "security.W002", "security.W003"]

ROOT_URLCONF = "api.urls"
ASGI_APPLICATION = "api.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def database_settings(url: str) -> dict[str, Any]:
    """The default database from its URL. Connections are kept for 10 minutes on every backend, SQLite's included:
    the control worker checks them before each task (`farm.celery`), and at `CONN_MAX_AGE = 0` it opened a new SQLite
    connection (and ran its PRAGMAs) for every control task."""
    database = dj_database_url.parse(url, conn_max_age=600, conn_health_checks=True)
    if database["ENGINE"] == "django.db.backends.sqlite3":
        env.FARM_HOME.mkdir(parents=True, exist_ok=True)
        # WAL lets the API read while the control worker writes; the timeout absorbs short write contention.
        database["OPTIONS"] = {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
        # Tests share the database with live server processes, so the test database must be a file.
        database["TEST"] = {"NAME": str(env.FARM_HOME / "test.sqlite3")}
    return database


DATABASES = {"default": database_settings(env.DATABASE_URL)}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = env.FARM_HOME / "static"

# The API reads bodies itself with a size check; this bounds Django's own form parsing (admin).
DATA_UPLOAD_MAX_MEMORY_SIZE = env.FARM_MAX_BODY_BYTES

# File bytes (`/v1/files`, batch outputs, fine-tuning artifacts) go through Django's storage API, alias "files":
# a local directory under FARM_HOME by default, any django-storages backend by setting (see settings/env.py).
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    "files": {
        "BACKEND": env.FARM_FILES_STORAGE,
        "OPTIONS": (
            json.loads(env.FARM_FILES_STORAGE_OPTIONS)
            if env.FARM_FILES_STORAGE_OPTIONS
            else {"location": str(env.FARM_HOME / "files")}
        ),
    },
}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["api.auth.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "EXCEPTION_HANDLER": "api.errors.drf_exception_handler",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}

# OpenAPI document at /api/schema/ (see `api.schema`): DRF views are described by drf-spectacular, the async OpenAI
# views by the operations they register; both end up in one OpenAPI 3.1 document.
SPECTACULAR_SETTINGS = {
    "TITLE": "farm API",
    "DESCRIPTION": "OpenAI-compatible inference API and farm resources. Errors are OpenAI error bodies.",
    "VERSION": "1.0.0",
    "OAS_VERSION": "3.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PUBLIC": True,
    "SERVE_AUTHENTICATION": [],
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums", "api.schema.add_registered_operations"],
}
# Static files are served from the installed apps (no collectstatic step in the images).
WHITENOISE_USE_FINDERS = True

CSRF_TRUSTED_ORIGINS = env.CSRF_TRUSTED_ORIGINS
if env.IS_PRODUCTION:
    if DEBUG:
        from django.core.exceptions import ImproperlyConfigured

        raise ImproperlyConfigured("DEBUG must be off when FARM_ENV=production.")
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_CONTENT_TYPE_NOSNIFF = True
    SECURE_HSTS_SECONDS = env.FARM_HSTS_SECONDS
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = env.FARM_HSTS_PRELOAD
    if env.FARM_TLS_PROXY:
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = env.FARM_SSL_REDIRECT
    # Probes and Prometheus scrape pods over plain HTTP: never redirected (patterns match the path without its "/").
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
    if not env.FARM_SSL_REDIRECT:
        # The operator chose plain HTTP inside the cluster (FARM_SSL_REDIRECT=0, deploy/README.md): not a mistake.
        SILENCED_SYSTEM_CHECKS += ["security.W008"]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    # Every line carries the request id it was written for (`-` outside a request): farm.request_ids.
    "filters": {"request_id": {"()": "farm.request_ids.RequestIdFilter"}},
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["request_id"]}},
    "root": {"handlers": ["console"], "level": "INFO"},
    "loggers": {"django.request": {"level": "ERROR"}},
}
