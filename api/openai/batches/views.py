"""`/v1/batches`: create, list, retrieve, cancel (OpenAI `Batch` objects). Another key owner's batch is a 404.

The lines run as ordinary inference jobs on the control worker's ticks (`farm.batches`); output and error files are
`batch_output` files of the Files API.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers
from rest_framework.decorators import api_view, parser_classes
from rest_framework.parsers import JSONParser
from rest_framework.request import Request
from rest_framework.response import Response

from api.openai.pagination import list_page, list_params
from api.schema import error_responses
from farm.batches import COMPLETION_WINDOWS, batch_cancel, batch_create, batch_get, batch_list
from farm.files import BATCH_URLS
from farm.models import Batch, BatchStatus


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value else None


def batch_object(batch: Batch) -> dict[str, Any]:
    """OpenAI's `Batch` object."""
    usage = batch.usage or {}
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": batch.errors,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id or None,
        "error_file_id": batch.error_file_id or None,
        "created_at": _ts(batch.created_at),
        "in_progress_at": _ts(batch.in_progress_at),
        "expires_at": _ts(batch.expires_at),
        "finalizing_at": _ts(batch.finalizing_at),
        "completed_at": _ts(batch.completed_at),
        "failed_at": _ts(batch.failed_at),
        "expired_at": _ts(batch.expired_at),
        "cancelling_at": _ts(batch.cancelling_at),
        "cancelled_at": _ts(batch.cancelled_at),
        "request_counts": {"total": batch.total, "completed": batch.completed, "failed": batch.failed},
        "metadata": batch.metadata,
        "usage": {
            "input_tokens": usage.get("input_tokens", 0),
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage.get("output_tokens", 0),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.get("total_tokens", 0),
        }
        if batch.usage
        else None,
    }


class RequestCounts(serializers.Serializer):
    total = serializers.IntegerField()
    completed = serializers.IntegerField()
    failed = serializers.IntegerField()


class BatchObject(serializers.Serializer):
    """OpenAI's `Batch` object (documentation; `batch_object` builds it)."""

    id = serializers.CharField()
    object = serializers.ChoiceField(choices=["batch"])
    endpoint = serializers.ChoiceField(choices=BATCH_URLS)
    errors = serializers.JSONField(allow_null=True)
    input_file_id = serializers.CharField()
    completion_window = serializers.CharField()
    status = serializers.ChoiceField(choices=BatchStatus.values)
    output_file_id = serializers.CharField(allow_null=True)
    error_file_id = serializers.CharField(allow_null=True)
    created_at = serializers.IntegerField()
    in_progress_at = serializers.IntegerField(allow_null=True)
    expires_at = serializers.IntegerField(allow_null=True)
    finalizing_at = serializers.IntegerField(allow_null=True)
    completed_at = serializers.IntegerField(allow_null=True)
    failed_at = serializers.IntegerField(allow_null=True)
    expired_at = serializers.IntegerField(allow_null=True)
    cancelling_at = serializers.IntegerField(allow_null=True)
    cancelled_at = serializers.IntegerField(allow_null=True)
    request_counts = RequestCounts()
    metadata = serializers.DictField(child=serializers.CharField(), allow_null=True)
    usage = serializers.JSONField(allow_null=True)


class BatchList(serializers.Serializer):
    object = serializers.CharField()
    data = BatchObject(many=True)
    has_more = serializers.BooleanField()
    first_id = serializers.CharField(allow_null=True)
    last_id = serializers.CharField(allow_null=True)


@extend_schema_field({"type": "string", "enum": list(BATCH_URLS)})
class EndpointField(serializers.CharField):
    """Documented as the endpoints `batch_create` accepts (it refuses others with its own message)."""


@extend_schema_field({"type": "string", "enum": list(COMPLETION_WINDOWS)})
class CompletionWindowField(serializers.CharField):
    """Documented as the windows `batch_create` accepts."""


@extend_schema_field(
    {
        "type": "object",  # drf-spectacular adds null (allow_null)
        "maxProperties": 16,
        "propertyNames": {"maxLength": 64},
        "additionalProperties": {"type": "string", "maxLength": 512},
    }
)
class MetadataField(serializers.JSONField):
    """Documented as `batch_create` checks it: at most 16 string keys (64 chars) with string values (512 chars)."""


class BatchCreate(serializers.Serializer):
    input_file_id = serializers.CharField(min_length=1, max_length=40)
    endpoint = EndpointField(max_length=100)
    completion_window = CompletionWindowField(max_length=10)
    metadata = MetadataField(required=False, allow_null=True)


class ListQuery(serializers.Serializer):
    limit = serializers.IntegerField(min_value=1, max_value=100, default=20)
    after = serializers.CharField(required=False)  # not an id (NUL, over-long): ignored, see list_params


def _create(request: Request) -> Response:
    params = BatchCreate(data=request.data)
    params.is_valid(raise_exception=True)
    data = params.validated_data
    batch = batch_create(
        owner_id=request.auth.owner_id,
        api_key_id=request.auth.key_id,
        input_file_id=data["input_file_id"],
        endpoint=data["endpoint"],
        completion_window=data["completion_window"],
        metadata=data.get("metadata"),
    )
    return Response(batch_object(batch))


def _list(request: Request) -> Response:
    query = ListQuery(data=list_params(request))
    query.is_valid(raise_exception=True)
    batches, more = batch_list(
        owner_id=request.auth.owner_id, limit=query.validated_data["limit"], after=query.validated_data.get("after")
    )
    data = [batch_object(b) for b in batches]
    return Response(list_page(data, has_more=more))


@extend_schema(
    methods=["POST"],
    operation_id="createBatch",
    summary="Create a batch from an uploaded `batch` file",
    tags=["Batches"],
    request=BatchCreate,
    responses={200: BatchObject, **error_responses(400, 401, 404, 503)},
)
@extend_schema(
    methods=["GET"],
    operation_id="listBatches",
    summary="List your batches, newest first",
    tags=["Batches"],
    parameters=[ListQuery],
    responses={200: BatchList, **error_responses(400, 401, 503)},
)
@api_view(["GET", "POST"])
@parser_classes([JSONParser])  # a JSON body, as OpenAI's (and the one content type the schema documents)
def batches_view(request: Request) -> Response:
    return _create(request) if request.method == "POST" else _list(request)


@extend_schema(
    operation_id="retrieveBatch",
    summary="Retrieve a batch",
    tags=["Batches"],
    responses={200: BatchObject, **error_responses(401, 404, 503)},
)
@api_view(["GET"])
def batch_view(request: Request, batch_id: str) -> Response:
    return Response(batch_object(batch_get(batch_id=batch_id, owner_id=request.auth.owner_id)))


@extend_schema(
    operation_id="cancelBatch",
    summary="Cancel a batch: no new lines start, running lines stop; finished lines keep their results",
    tags=["Batches"],
    request=None,
    responses={200: BatchObject, **error_responses(401, 404, 409, 503)},
)
@api_view(["POST"])
def batch_cancel_view(request: Request, batch_id: str) -> Response:
    return Response(batch_object(batch_cancel(batch_id=batch_id, owner_id=request.auth.owner_id)))
