"""`/v1/models/{model}/cache`: model cache jobs (farm extension, not an OpenAI endpoint). Staff keys, or keys whose
allowed models include the model, may start one.

    POST /v1/models/{model}/cache            {"source"?: path | *.gguf | hub id | "demo", "target"?: name}  -> 202 job
    GET  /v1/models/{model}/cache            the model's cache jobs, newest first
    GET  /v1/models/{model}/cache/{job_id}   one job: status queued | running | succeeded | failed, progress 0..1,
                                             bytes_done / bytes_total, error
"""

from __future__ import annotations

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.decorators import api_view
from rest_framework.request import Request
from rest_framework.response import Response

from api.schema import error_responses
from farm.errors import InvalidRequest
from farm.model_cache import model_cache_allowed, model_cache_get, model_cache_list, model_cache_request


def _optional_text(data: object, key: str) -> str | None:
    value = data.get(key) if isinstance(data, dict) else None
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise InvalidRequest(f"`{key}` must be a non-empty string.", param=key)
    return value


# A cache job as `farm.model_cache` stores it (progress figures are free-form while it runs).
CACHE_JOB_SCHEMA = {
    "type": "object",
    "required": ["id", "model", "status"],
    "properties": {"id": {"type": "string"}, "model": {"type": "string"}, "status": {"type": "string"}},
}
CacheRequest = inline_serializer(
    "ModelCacheRequest",
    {
        "source": serializers.CharField(required=False, min_length=1, help_text="path, *.gguf, hub id or `demo`"),
        "target": serializers.CharField(required=False, min_length=1, help_text="directory name under the store"),
    },
)


@extend_schema(
    methods=["GET"],
    operation_id="listModelCacheJobs",
    summary="A model's cache jobs, newest first (farm extension)",
    tags=["Fleet"],
    responses={
        200: {
            "type": "object",
            "required": ["object", "data"],
            "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": CACHE_JOB_SCHEMA}},
        },
        **error_responses(401, 403, 404, 503),
    },
)
@extend_schema(
    methods=["POST"],
    operation_id="createModelCacheJob",
    summary="Fill the shared model directory ahead of demand (farm extension)",
    tags=["Fleet"],
    request=CacheRequest,
    responses={202: CACHE_JOB_SCHEMA, **error_responses(400, 401, 403, 404, 503)},
)
@api_view(["GET", "POST"])
def model_cache_view(request: Request, model_id: str) -> Response:
    model_cache_allowed(principal=request.auth, is_staff=request.user.is_staff, model_name=model_id)
    if request.method == "GET":
        return Response({"object": "list", "data": model_cache_list(model_name=model_id)})
    data = request.data if request.data else {}
    if not isinstance(data, dict):
        raise InvalidRequest("The body must be a JSON object.")
    job = model_cache_request(
        model_name=model_id,
        source=_optional_text(data, "source"),
        target=_optional_text(data, "target"),
        by=request.auth.prefix,
    )
    return Response(job, status=202)


@extend_schema(
    operation_id="retrieveModelCacheJob",
    summary="One model cache job: status, progress, bytes, error (farm extension)",
    tags=["Fleet"],
    responses={200: CACHE_JOB_SCHEMA, **error_responses(401, 403, 404, 503)},
)
@api_view(["GET"])
def model_cache_job_view(request: Request, model_id: str, job_id: str) -> Response:
    model_cache_allowed(principal=request.auth, is_staff=request.user.is_staff, model_name=model_id)
    return Response(model_cache_get(job_id=job_id, model_name=model_id))
