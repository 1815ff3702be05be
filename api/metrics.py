"""`GET /metrics`: Prometheus exposition of `farm.metrics`."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from farm.db import run_db
from farm.metrics import REGISTRY


async def metrics(request: HttpRequest) -> HttpResponse:
    body = await run_db(generate_latest, REGISTRY)  # the fleet collector queries the database and Redis
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
