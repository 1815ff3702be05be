"""`GET /v1/usage`: the key owner's usage per day, model and key (only their own rows)."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.decorators import api_view
from rest_framework.request import Request
from rest_framework.response import Response

from api.schema import error_responses
from farm.models import Usage
from farm.usage import usage_list

DEFAULT_DAYS = 30
MAX_DAYS = 366


class UsageSerializer(serializers.ModelSerializer):
    object = serializers.SerializerMethodField()
    date = serializers.DateField(source="day")
    api_key = serializers.SerializerMethodField()
    total_tokens = serializers.IntegerField()

    class Meta:
        model = Usage
        fields = [
            "object",
            "date",
            "model",
            "api_key",
            "requests",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
        ]
        read_only_fields = fields

    def get_object(self, row: Usage) -> str:
        return "usage.daily"

    def get_api_key(self, row: Usage) -> str:
        """The key's visible prefix (never the secret)."""
        return row.api_key.prefix


UsageList = inline_serializer(
    "UsageList",
    {
        "object": serializers.CharField(),
        "start_date": serializers.DateField(),
        "end_date": serializers.DateField(),
        "data": UsageSerializer(many=True),
        "totals": inline_serializer(
            "UsageTotals",
            {
                name: serializers.IntegerField()
                for name in ("requests", "prompt_tokens", "completion_tokens", "total_tokens")
            },
        ),
    },
)


def _date(request: Request, name: str, default: date) -> date:
    value = request.query_params.get(name)
    if not value:  # empty is absent, as DRF serializers read query strings
        return default
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise serializers.ValidationError({name: ["must be a date as YYYY-MM-DD"]}) from None


@extend_schema(
    operation_id="listUsage",
    summary="Your usage per day, model and API key",
    tags=["Usage"],
    parameters=[
        OpenApiParameter(
            "start_date",
            OpenApiTypes.DATE,
            description=f"First day, UTC, inclusive (default: {DEFAULT_DAYS} days ago).",
        ),
        OpenApiParameter("end_date", OpenApiTypes.DATE, description="Last day, inclusive (default: today)."),
        OpenApiParameter(
            "model",
            OpenApiTypes.STR,
            description="Only this model (up to 200 characters, no NUL).",
            pattern="^[^\\u0000]{0,200}$",
        ),
    ],
    responses={200: UsageList, **error_responses(400, 401, 503)},
)
@api_view(["GET"])
def usage_view(request: Request) -> Response:
    today = timezone.now().date()
    end = _date(request, "end_date", today)
    start = _date(
        request, "start_date", max(date.min + timedelta(days=DEFAULT_DAYS - 1), end) - timedelta(days=DEFAULT_DAYS - 1)
    )  # no OverflowError for an end_date in year 1
    if start > end:
        raise serializers.ValidationError({"start_date": ["must not be after end_date"]})
    if (end - start).days >= MAX_DAYS:
        raise serializers.ValidationError({"start_date": [f"the range may span at most {MAX_DAYS} days"]})
    model = request.query_params.get("model") or None
    if model is not None and ("\x00" in model or len(model) > 200):
        raise serializers.ValidationError({"model": ["must be a model name"]})
    data: list[dict[str, Any]] = UsageSerializer(
        usage_list(owner_id=request.auth.owner_id, start=start, end=end, model=model), many=True
    ).data
    totals = {
        name: sum(row[name] for row in data)
        for name in ("requests", "prompt_tokens", "completion_tokens", "total_tokens")
    }
    return Response({"object": "list", "start_date": start, "end_date": end, "data": data, "totals": totals})
