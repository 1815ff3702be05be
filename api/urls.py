"""Every route of the control plane's HTTP server."""

from django.contrib import admin
from django.urls import path, re_path
from drf_spectacular.views import SpectacularSwaggerView

from api import health
from api.errors import not_found
from api.fleet.cache_views import model_cache_job_view, model_cache_view
from api.fleet.views import workers_view
from api.metrics import metrics
from api.openai.batches.views import batch_cancel_view, batch_view, batches_view
from api.openai.chat.views import chat_completions
from api.openai.completions.views import completions
from api.openai.files.views import file_content_view, file_view, files_view
from api.openai.fine_tuning.views import (
    eval_loss_view,
    fine_tuning_checkpoints_view,
    fine_tuning_events_view,
    fine_tuning_job_cancel_view,
    fine_tuning_job_view,
    fine_tuning_jobs_view,
)
from api.openai.jobs.views import job_cancel_view, job_detail, job_list
from api.openai.models.views import model_detail, model_list
from api.openai.usage.views import usage_view
from api.schema import SchemaView
from api.worker_io import job_adapter_view, job_artifact_view, job_input_view
from settings import env

urlpatterns = [
    path("v1/chat/completions", chat_completions),
    path("v1/completions", completions),
    path("v1/models", model_list),
    path("v1/models/<path:model_id>/cache", model_cache_view),
    path("v1/models/<path:model_id>/cache/<str:job_id>", model_cache_job_view),
    path("v1/models/<path:model_id>", model_detail),
    path("v1/usage", usage_view),
    path("v1/jobs", job_list),
    path("v1/jobs/<uuid:job_id>", job_detail),
    path("v1/jobs/<uuid:job_id>/cancel", job_cancel_view),
    path("v1/files", files_view),
    path("v1/files/<str:file_id>", file_view),
    path("v1/files/<str:file_id>/content", file_content_view),
    path("v1/batches", batches_view),
    path("v1/batches/<str:batch_id>", batch_view),
    path("v1/batches/<str:batch_id>/cancel", batch_cancel_view),
    path("v1/fine_tuning/jobs", fine_tuning_jobs_view),
    path("v1/fine_tuning/jobs/<str:fine_tuning_job_id>", fine_tuning_job_view),
    path("v1/fine_tuning/jobs/<str:fine_tuning_job_id>/cancel", fine_tuning_job_cancel_view),
    path("v1/fine_tuning/jobs/<str:fine_tuning_job_id>/events", fine_tuning_events_view),
    path("v1/fine_tuning/jobs/<str:fine_tuning_job_id>/checkpoints", fine_tuning_checkpoints_view),
    path("v1/evals/loss", eval_loss_view),
    path("api/jobs/<str:job_id>/files/<str:file_id>/content", job_input_view),
    path("api/jobs/<str:job_id>/adapter", job_adapter_view),
    path("api/job-artifacts", job_artifact_view),
    path("api/workers", workers_view),
    path("healthz", health.healthz),
    path("readyz", health.readyz),
    path("metrics", metrics),
    path("api/schema/", SchemaView.as_view(), name="openapi-schema"),  # see api/schema.py
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="openapi-schema"), name="openapi-docs"),
    re_path(r"^v1/", not_found),  # unknown /v1 routes answer in the OpenAI error shape, DEBUG or not
]

if env.FARM_ADMIN_PATH:  # off in production unless FARM_ADMIN_PATH is set (README, "Operating")
    urlpatterns.insert(0, path(env.FARM_ADMIN_PATH, admin.site.urls))

handler404 = "api.errors.not_found"
handler500 = "api.errors.server_error"
