"""`GET /api/workers`: the live fleet (any API key). Each worker's hardware (GPUs through NVML: name, UUID, VRAM
total/free/used, utilisation, temperature, power; CPU hosts: cores, RAM, ISA flags), loaded models and load
(running, capacity, queued, tokens/s), as its last heartbeat reported them (see `gpu_workers/heartbeat.py`);
workers gone silent are listed `offline` from the database mirror (`?offline=false` leaves them out)."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.decorators import api_view
from rest_framework.request import Request
from rest_framework.response import Response

from api.schema import error_responses
from farm.fleet import fleet_workers

# What `farm.fleet` reports per worker (hardware, load and models are free-form heartbeat figures).
WORKER_SCHEMA = {
    "type": "object",
    "required": ["id", "object", "status", "specs", "hardware", "load", "models"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "worker"},
        "status": {"type": "string"},
        "hostname": {"type": ["string", "null"]},
        "specs": {"type": "array", "items": {"type": "string"}},
        "hardware": {"type": "object"},
        "load": {"type": "object"},
        "models": {"type": "array"},
        "heartbeat_age_s": {"type": ["number", "null"]},
        "last_seen_at": {"type": ["integer", "null"]},
        "started_at": {"type": ["integer", "null"]},
    },
}


_FLAGS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


@extend_schema(
    operation_id="listWorkers",
    summary="The live fleet: hardware, loaded models and load per worker",
    tags=["Fleet"],
    parameters=[
        OpenApiParameter(
            "offline", OpenApiTypes.STR, enum=list(_FLAGS), description="List silent workers too (default)."
        )
    ],
    responses={
        200: {
            "type": "object",
            "required": ["object", "data"],
            "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": WORKER_SCHEMA}},
        },
        **error_responses(400, 401, 503),
    },
)
@api_view(["GET"])
def workers_view(request: Request) -> Response:
    flag = (request.query_params.get("offline") or "true").lower()
    if flag not in _FLAGS:
        raise serializers.ValidationError({"offline": [f"must be one of {', '.join(_FLAGS)}"]})
    include_offline = _FLAGS[flag]
    return Response({"object": "list", "data": fleet_workers(include_offline=include_offline)})
