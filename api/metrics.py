"""`GET /metrics`: Prometheus exposition of `farm.metrics`."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.errors import allow_methods
from api.schema import Response, operation
from farm.db import run_db
from farm.metrics import REGISTRY


@operation(
    method="GET",
    operation_id="metrics",
    summary="Prometheus metrics",
    tags=("Operations",),
    auth=False,
    responses={200: Response("Prometheus text exposition format.", {"text/plain": {"type": "string"}})},
)
@allow_methods("GET")
async def metrics(request: HttpRequest) -> HttpResponse:
    body = await run_db(generate_latest, REGISTRY)  # the fleet collector queries the database and Redis
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
