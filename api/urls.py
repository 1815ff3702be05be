"""Every route of the control plane's HTTP server."""

from django.contrib import admin
from django.urls import path, re_path

from api import health
from api.errors import not_found
from api.metrics import metrics
from api.openai.chat.views import chat_completions
from api.openai.completions.views import completions
from api.openai.jobs.views import job_cancel_view, job_detail, job_list
from api.openai.models.views import model_detail, model_list

urlpatterns = [
    path("v1/chat/completions", chat_completions),
    path("v1/completions", completions),
    path("v1/models", model_list),
    path("v1/models/<path:model_id>", model_detail),
    path("v1/jobs", job_list),
    path("v1/jobs/<uuid:job_id>", job_detail),
    path("v1/jobs/<uuid:job_id>/cancel", job_cancel_view),
    path("healthz", health.healthz),
    path("readyz", health.readyz),
    path("metrics", metrics),
    path("admin/", admin.site.urls),
    re_path(r"^v1/", not_found),  # unknown /v1 routes answer in the OpenAI error shape, DEBUG or not
]

handler404 = "api.errors.not_found"
handler500 = "api.errors.server_error"
