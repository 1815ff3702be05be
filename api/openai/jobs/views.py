"""`/v1/jobs`: the key owner's jobs (list, retrieve, cancel). Another owner's job is a 404."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers
from rest_framework.decorators import api_view
from rest_framework.request import Request
from rest_framework.response import Response

from farm.jobs import job_cancel, job_get
from farm.models import Job


class JobSerializer(serializers.ModelSerializer):
    object = serializers.SerializerMethodField()
    model = serializers.SlugRelatedField(slug_field="name", read_only=True)

    class Meta:
        model = Job
        fields = ["id", "object", "kind", "model", "status", "attempt", "max_attempts", "created_at", "started_at",
                  "finished_at", "deadline_at", "usage", "error", "result"]

    def get_object(self, job: Job) -> str:
        return "job"


def _limit(request: Request) -> int:
    try:
        return max(1, min(100, int(request.query_params.get("limit", 20))))
    except ValueError:
        raise serializers.ValidationError({"limit": ["must be an integer between 1 and 100"]}) from None


@api_view(["GET"])
def job_list(request: Request) -> Response:
    jobs = Job.objects.select_related("model").filter(owner_id=request.auth.owner_id)
    status = request.query_params.get("status")
    if status:
        jobs = jobs.filter(status=status)
    after = request.query_params.get("after")
    if after:
        anchor = Job.objects.filter(pk=after, owner_id=request.auth.owner_id).values("created_at").first()
        if anchor:
            jobs = jobs.filter(created_at__lt=anchor["created_at"])
    limit = _limit(request)
    page = list(jobs[: limit + 1])
    data: list[dict[str, Any]] = JobSerializer(page[:limit], many=True).data
    return Response({"object": "list", "data": data, "has_more": len(page) > limit,
                     "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})


@api_view(["GET"])
def job_detail(request: Request, job_id: str) -> Response:
    return Response(JobSerializer(job_get(job_id=str(job_id), owner_id=request.auth.owner_id)).data)


@api_view(["POST"])
def job_cancel_view(request: Request, job_id: str) -> Response:
    return Response(JobSerializer(job_cancel(job_id=str(job_id), owner_id=request.auth.owner_id)).data)
