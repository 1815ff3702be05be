"""`GET /v1/models` and `GET /v1/models/{id}`: public model names (specs are never shown)."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, JsonResponse

from api.auth import authenticate
from api.errors import openai_endpoint
from farm.catalog import ModelEntry, model_catalog
from farm.inference import model_resolve


def _model_object(model: ModelEntry) -> dict[str, Any]:
    return {"id": model.name, "object": "model", "created": model.created, "owned_by": model.owned_by}


@openai_endpoint("GET")
async def model_list(request: HttpRequest) -> JsonResponse:
    await authenticate(request)
    models = sorted((await model_catalog()).values(), key=lambda m: m.name)
    return JsonResponse({"object": "list", "data": [_model_object(m) for m in models]})


@openai_endpoint("GET")
async def model_detail(request: HttpRequest, model_id: str) -> JsonResponse:
    await authenticate(request)
    return JsonResponse(_model_object(await model_resolve(model_id)))
