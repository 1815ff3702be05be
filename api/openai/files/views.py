"""`/v1/files`: upload (multipart, as the `openai` SDK sends it), list, retrieve, content, delete.

Owner-scoped: another key owner's file is a 404. Size: `FARM_MAX_UPLOAD_BYTES` (413), enforced while the body
streams in (`api.asgi`) and again on the stored size; uploads spool to disk past Django's in-memory threshold.
"""

from __future__ import annotations

from typing import Any

from django.http import FileResponse, HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.decorators import api_view, parser_classes
from rest_framework.parsers import MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response

from api.auth import bearer_token
from api.errors import farm_error_response, method_not_allowed
from api.openai.batches.lines import batch_body_check
from api.openai.pagination import list_page, list_params
from api.schema import Response as SchemaResponse
from api.schema import error_responses, operation
from farm.api_keys import api_key_authenticate_sync
from farm.errors import FarmError, Unauthenticated
from farm.files import UPLOAD_PURPOSES, file_create, file_delete, file_get, file_list, file_open
from farm.models import File, FilePurpose


def file_object(file: File) -> dict[str, Any]:
    """OpenAI's `File` object."""
    return {
        "id": file.id,
        "object": "file",
        "bytes": file.bytes,
        "created_at": int(file.created_at.timestamp()),
        "expires_at": int(file.expires_at.timestamp()) if file.expires_at else None,
        "filename": file.filename,
        "purpose": file.purpose,
        "status": file.status,
        "status_details": None,
    }


class FileObject(serializers.Serializer):
    """OpenAI's `File` object (documentation; `file_object` builds it)."""

    id = serializers.CharField()
    object = serializers.ChoiceField(choices=["file"])
    bytes = serializers.IntegerField()
    created_at = serializers.IntegerField()
    expires_at = serializers.IntegerField(allow_null=True)
    filename = serializers.CharField()
    purpose = serializers.ChoiceField(choices=FilePurpose.values)
    status = serializers.CharField()
    status_details = serializers.CharField(allow_null=True)


FileList = inline_serializer(
    "FileList",
    {
        "object": serializers.CharField(),
        "data": FileObject(many=True),
        "has_more": serializers.BooleanField(),
        "first_id": serializers.CharField(allow_null=True),
        "last_id": serializers.CharField(allow_null=True),
    },
)
FileDeleted = inline_serializer(
    "FileDeleted",
    {"id": serializers.CharField(), "object": serializers.CharField(), "deleted": serializers.BooleanField()},
)
FileUpload = inline_serializer(
    "FileUpload", {"file": serializers.FileField(), "purpose": serializers.ChoiceField(choices=UPLOAD_PURPOSES)}
)


class ListQuery(serializers.Serializer):
    purpose = serializers.ChoiceField(choices=FilePurpose.values, required=False)
    limit = serializers.IntegerField(min_value=1, max_value=10000, default=10000)
    after = serializers.CharField(required=False)  # not an id (NUL, over-long): ignored, see list_params
    order = serializers.ChoiceField(choices=["asc", "desc"], default="desc")


def _upload(request: Request) -> Response:
    purpose = request.data.get("purpose")
    if not purpose:
        raise serializers.ValidationError({"purpose": ["Missing required parameter: 'purpose'."]})
    if purpose not in UPLOAD_PURPOSES:
        raise serializers.ValidationError({"purpose": [f"must be one of {', '.join(UPLOAD_PURPOSES)}."]})
    upload = request.FILES.get("file")
    if upload is None:
        raise serializers.ValidationError({"file": ["Missing required parameter: 'file' (a multipart file part)."]})
    file = file_create(
        owner_id=request.auth.owner_id,
        api_key_id=request.auth.key_id,
        purpose=purpose,
        filename=upload.name or "file",
        content=upload,
        body_check=batch_body_check if purpose == FilePurpose.BATCH else None,
    )
    return Response(file_object(file))


def _list(request: Request) -> Response:
    query = ListQuery(data=list_params(request))
    query.is_valid(raise_exception=True)
    q = query.validated_data
    files, more = file_list(
        owner_id=request.auth.owner_id,
        purpose=q.get("purpose"),
        limit=q["limit"],
        after=q.get("after"),
        order=q["order"],
    )
    data = [file_object(f) for f in files]
    return Response(list_page(data, has_more=more))


@extend_schema(
    methods=["POST"],
    operation_id="createFile",
    summary="Upload a file (JSONL for batch and fine-tune, checked line by line)",
    tags=["Files"],
    request={"multipart/form-data": FileUpload},
    responses={200: FileObject, **error_responses(400, 401, 413, 503)},
)
@extend_schema(
    methods=["GET"],
    operation_id="listFiles",
    summary="List your files",
    tags=["Files"],
    parameters=[ListQuery],
    responses={200: FileList, **error_responses(400, 401, 503)},
)
@api_view(["GET", "POST"])
@parser_classes([MultiPartParser])
def files_view(request: Request) -> Response:
    return _upload(request) if request.method == "POST" else _list(request)


@extend_schema(
    methods=["GET"],
    operation_id="retrieveFile",
    summary="Retrieve a file's metadata",
    tags=["Files"],
    responses={200: FileObject, **error_responses(401, 404, 503)},
)
@extend_schema(
    methods=["DELETE"],
    operation_id="deleteFile",
    summary="Delete a file",
    tags=["Files"],
    responses={200: FileDeleted, **error_responses(401, 404, 503)},
)
@api_view(["GET", "DELETE"])
def file_view(request: Request, file_id: str) -> Response:
    if request.method == "DELETE":
        file_delete(file_id=file_id, owner_id=request.auth.owner_id)
        return Response({"id": file_id, "object": "file", "deleted": True})
    return Response(file_object(file_get(file_id=file_id, owner_id=request.auth.owner_id)))


@operation(
    method="GET",
    operation_id="downloadFile",
    summary="Download a file's bytes",
    tags=("Files",),
    errors=(401, 404, 503),
    responses={200: SchemaResponse("The file's bytes.", {"application/octet-stream": {"type": "string"}})},
)
@csrf_exempt
def file_content_view(request: HttpRequest, file_id: str) -> HttpResponse:
    """A plain Django view, not DRF: the SDK asks for `Accept: application/binary`, which DRF's content negotiation
    would refuse; errors are still OpenAI error bodies."""
    if request.method not in ("GET", "HEAD"):
        return method_not_allowed(request, ("GET",))
    try:
        principal = api_key_authenticate_sync(bearer_token(request))
        if principal is None:
            raise Unauthenticated("Incorrect API key provided.")
        file = file_get(file_id=file_id, owner_id=principal.owner_id)
        handle = file_open(file=file)
    except FarmError as exc:
        return farm_error_response(exc)
    response = FileResponse(handle, as_attachment=True, filename=file.filename, content_type="application/octet-stream")
    response["Content-Length"] = str(file.bytes)
    return response
