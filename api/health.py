"""Liveness (`/healthz`: the process answers) and readiness (`/readyz`: database and broker reachable)."""

from __future__ import annotations

from typing import Literal

from django.db import connection
from django.http import HttpRequest
from pydantic import BaseModel

from api.errors import allow_methods
from api.json_response import OrjsonResponse
from api.schema import Response, operation
from farm.db import run_db
from farm.redis_client import async_redis


class Liveness(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str]  # dependency -> "ok" or "error: <exception class>"


@operation(
    method="GET",
    operation_id="healthz",
    summary="Liveness: the process answers",
    tags=("Operations",),
    auth=False,
    responses={200: Response("Alive.", {"application/json": Liveness})},
)
@allow_methods("GET")
async def healthz(request: HttpRequest) -> OrjsonResponse:
    return OrjsonResponse({"status": "ok"})


def _database_ok() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


@operation(
    method="GET",
    operation_id="readyz",
    summary="Readiness: database and broker reachable",
    tags=("Operations",),
    auth=False,
    responses={
        200: Response("Ready.", {"application/json": Readiness}),
        503: Response("A dependency is down.", {"application/json": Readiness}),
    },
)
@allow_methods("GET")
async def readyz(request: HttpRequest) -> OrjsonResponse:
    checks: dict[str, str] = {}
    try:
        await run_db(_database_ok)
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {exc.__class__.__name__}"
    try:
        await async_redis().ping()
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"error: {exc.__class__.__name__}"
    ready = all(value == "ok" for value in checks.values())
    return OrjsonResponse({"status": "ok" if ready else "unavailable", "checks": checks}, status=200 if ready else 503)
