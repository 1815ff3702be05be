"""Job I/O for workers, authenticated by a job-scoped token (`farm.job_tokens`), never by an API key:

- `GET  /api/jobs/<id>/files/<file_id>/content`: an input file of that job (training, validation or eval data);
- `GET  /api/jobs/<id>/adapter`: the LoRA adapter that job needs (its fine-tuned model's, or its starting one);
- `POST /api/job-artifacts` (multipart `name`, `file`): an artifact of the token's job (a fine-tune's adapter).

The two downloads also take the job owner's API key (they are the owner's own files); uploads take the token only.

Plain Django views (binary bodies both ways); errors are OpenAI error bodies. The upload path is fixed (the token
names the job) so the ASGI size guard streams it with its own limit (FARM_MAX_ARTIFACT_BYTES).
"""

from __future__ import annotations

import uuid

from django.http import FileResponse, HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from api.auth import bearer_token
from api.errors import farm_error_response, method_not_allowed
from api.schema import Response as SchemaResponse
from api.schema import operation
from farm.api_keys import api_key_authenticate_sync
from farm.errors import FarmError, InvalidRequest, NotFound, Unauthenticated
from farm.files import file_open
from farm.fine_tuning import job_adapter_file, job_artifact_store, job_input_file
from farm.job_tokens import PREFIX, JobGrant, job_token_verify
from farm.models import File, Job

_BINARY = {"application/octet-stream": {"type": "string"}}


def _read_grant(request: HttpRequest, job_id: str) -> JobGrant:
    """Reading a job's inputs or adapter: its live attempt's token (workers), or its owner's API key."""
    try:
        job_id = str(uuid.UUID(job_id))
    except ValueError:
        raise NotFound(f"No job with id {job_id}.", param="job_id", code="job_not_found") from None
    token = bearer_token(request)
    if token.startswith(PREFIX):
        return job_token_verify(token=token, job_id=job_id)
    principal = api_key_authenticate_sync(token)
    if principal is None:
        raise Unauthenticated("Incorrect API key or job token provided.")
    job = Job.objects.select_related("model").filter(pk=job_id, owner_id=principal.owner_id).first()
    if job is None:
        raise NotFound(f"No job with id {job_id}.", param="job_id", code="job_not_found")
    return JobGrant(job=job, attempt=job.attempt)


def _file_response(file: File) -> HttpResponse:
    response = FileResponse(
        file_open(file=file), as_attachment=True, filename=file.filename, content_type="application/octet-stream"
    )
    response["Content-Length"] = str(file.bytes)
    return response


@operation(
    method="GET",
    operation_id="downloadJobInput",
    summary="Download an input file of a job (workers)",
    tags=("Worker I/O",),
    errors=(401, 403, 404, 503),
    description="Bearer: the job attempt's token (not an API key).",
    responses={200: SchemaResponse("The file's bytes.", _BINARY)},
)
@csrf_exempt
def job_input_view(request: HttpRequest, job_id: str, file_id: str) -> HttpResponse:
    if request.method not in ("GET", "HEAD"):
        return method_not_allowed(request, ("GET",))
    try:
        grant = _read_grant(request, job_id)
        return _file_response(job_input_file(grant=grant, file_id=file_id))
    except FarmError as exc:
        return farm_error_response(exc)


@operation(
    method="GET",
    operation_id="downloadJobAdapter",
    summary="Download the LoRA adapter a job needs (workers)",
    tags=("Worker I/O",),
    errors=(401, 403, 404, 503),
    description="Bearer: the job attempt's token (not an API key).",
    responses={200: SchemaResponse("The adapter as a tar (adapter_config.json + safetensors).", _BINARY)},
)
@csrf_exempt
def job_adapter_view(request: HttpRequest, job_id: str) -> HttpResponse:
    if request.method not in ("GET", "HEAD"):
        return method_not_allowed(request, ("GET",))
    try:
        grant = _read_grant(request, job_id)
        return _file_response(job_adapter_file(grant=grant))
    except FarmError as exc:
        return farm_error_response(exc)


@operation(
    method="POST",
    operation_id="uploadJobArtifact",
    summary="Upload an artifact of a job (workers)",
    tags=("Worker I/O",),
    errors=(400, 401, 403, 413, 503),
    description="Bearer: the job attempt's token. Multipart fields `name` (`adapter`) and `file` (a tar).",
    responses={
        200: SchemaResponse(
            "The stored file's id.",
            {
                "application/json": {
                    "type": "object",
                    "properties": {"file_id": {"type": "string"}, "bytes": {"type": "integer"}},
                }
            },
        )
    },
)
@csrf_exempt
def job_artifact_view(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        return method_not_allowed(request, ("POST",))
    try:
        grant = job_token_verify(token=bearer_token(request))
        upload = request.FILES.get("file")
        name = request.POST.get("name", "")
        if upload is None:
            raise InvalidRequest(
                "Missing required parameter: 'file' (a multipart file part).",
                param="file",
                code="missing_required_parameter",
            )
        file = job_artifact_store(grant=grant, name=name, content=upload)
    except FarmError as exc:
        return farm_error_response(exc)
    return JsonResponse({"file_id": file.pk, "bytes": file.bytes})
