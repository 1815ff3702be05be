"""`/v1/jobs`: the key owner's jobs (list, retrieve, cancel). Another owner's job is a 404."""

from __future__ import annotations

import uuid
from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field, inline_serializer
from rest_framework import serializers
from rest_framework.decorators import api_view
from rest_framework.request import Request
from rest_framework.response import Response

from api.openai.pagination import list_page
from api.schema import error_responses
from farm.jobs import job_cancel, job_get
from farm.models import Job, JobStatus


@extend_schema_field({"type": ["object", "null"]})
class JsonObjectField(serializers.JSONField):
    """A JSON object or null (drf-spectacular would document any JSON value)."""


class JobSerializer(serializers.ModelSerializer):
    object = serializers.SerializerMethodField()
    model = serializers.SlugRelatedField(slug_field="name", read_only=True, allow_null=True)
    usage = JsonObjectField(read_only=True)
    error = JsonObjectField(read_only=True)
    result = JsonObjectField(read_only=True)

    class Meta:
        model = Job
        fields = [
            "id",
            "object",
            "kind",
            "model",
            "status",
            "attempt",
            "max_attempts",
            "created_at",
            "started_at",
            "finished_at",
            "deadline_at",
            "usage",
            "error",
            "result",
            "request_id",
        ]
        read_only_fields = fields  # a response-only serializer: every field is always present

    def get_object(self, job: Job) -> str:
        return "job"


JobList = inline_serializer(
    "JobList",
    {
        "object": serializers.CharField(),
        "data": JobSerializer(many=True),
        "has_more": serializers.BooleanField(),
        "first_id": serializers.UUIDField(allow_null=True),
        "last_id": serializers.UUIDField(allow_null=True),
    },
)


def _limit(request: Request) -> int:
    try:
        return max(1, min(100, int(request.query_params.get("limit") or 20)))
    except ValueError:
        raise serializers.ValidationError({"limit": ["must be an integer between 1 and 100"]}) from None


def _status(request: Request) -> str | None:
    status = request.query_params.get("status") or None  # empty is absent, as DRF serializers read query strings
    if status is not None and status not in JobStatus.values:
        raise serializers.ValidationError({"status": [f"must be one of {', '.join(JobStatus.values)}"]})
    return status


def _after(request: Request) -> str | None:
    after = request.query_params.get("after")
    if not after:
        return None
    try:
        return str(uuid.UUID(after))
    except ValueError:  # also keeps NUL bytes and other junk away from the database
        raise serializers.ValidationError({"after": ["must be a job id"]}) from None


@extend_schema(
    operation_id="listJobs",
    summary="List your jobs, newest first",
    tags=["Jobs"],
    parameters=[
        OpenApiParameter("limit", OpenApiTypes.INT, description="1 to 100 (default 20; clamped)."),
        OpenApiParameter("status", OpenApiTypes.STR, enum=JobStatus.values),
        OpenApiParameter("after", OpenApiTypes.UUID, description="A job id: list the jobs created before it."),
    ],
    responses={200: JobList, **error_responses(400, 401, 503)},
)
@api_view(["GET"])
def job_list(request: Request) -> Response:
    jobs = Job.objects.select_related("model").filter(owner_id=request.auth.owner_id)
    status = _status(request)
    if status:
        jobs = jobs.filter(status=status)
    after = _after(request)
    if after:
        anchor = Job.objects.filter(pk=after, owner_id=request.auth.owner_id).values("created_at").first()
        if anchor:
            jobs = jobs.filter(created_at__lt=anchor["created_at"])
    limit = _limit(request)
    page = list(jobs[: limit + 1])
    data: list[dict[str, Any]] = JobSerializer(page[:limit], many=True).data
    return Response(list_page(data, has_more=len(page) > limit))


@extend_schema(
    operation_id="retrieveJob",
    summary="Retrieve one of your jobs",
    tags=["Jobs"],
    responses={200: JobSerializer, **error_responses(401, 404, 503)},
)
@api_view(["GET"])
def job_detail(request: Request, job_id: str) -> Response:
    return Response(JobSerializer(job_get(job_id=str(job_id), owner_id=request.auth.owner_id)).data)


@extend_schema(
    operation_id="cancelJob",
    summary="Cancel a queued or running job",
    tags=["Jobs"],
    request=None,
    responses={200: JobSerializer, **error_responses(401, 404, 409, 503)},
)
@api_view(["POST"])
def job_cancel_view(request: Request, job_id: str) -> Response:
    return Response(JobSerializer(job_cancel(job_id=str(job_id), owner_id=request.auth.owner_id)).data)
