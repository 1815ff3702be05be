"""`GET /v1/models` and `GET /v1/models/{id}`: public model names (specs are never shown); a fine-tuned model only
to its owner's keys."""

from __future__ import annotations

from typing import Any, Literal

from django.http import HttpRequest
from pydantic import BaseModel

from api.auth import authenticate
from api.errors import openai_endpoint
from api.json_response import OrjsonResponse
from api.schema import Response, operation
from farm.catalog import ModelEntry, model_catalog
from farm.inference import model_resolve


class ModelObject(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelObject]


def _model_object(model: ModelEntry) -> dict[str, Any]:
    return {"id": model.name, "object": "model", "created": model.created, "owned_by": model.owned_by}


@operation(method="GET", operation_id="listModels", summary="List the models this farm serves", tags=("OpenAI",),
           responses={200: Response("Public model names.", {"application/json": ModelList})}, errors=(401, 500, 503))
@openai_endpoint("GET")
async def model_list(request: HttpRequest) -> OrjsonResponse:
    principal = await authenticate(request)
    models = sorted((m for m in (await model_catalog()).values() if m.visible_to(principal.owner_id)),
                    key=lambda m: m.name)
    return OrjsonResponse({"object": "list", "data": [_model_object(m) for m in models]})


@operation(method="GET", operation_id="retrieveModel", summary="Retrieve a model", tags=("OpenAI",),
           responses={200: Response("The model.", {"application/json": ModelObject})}, errors=(401, 404, 500, 503))
@openai_endpoint("GET")
async def model_detail(request: HttpRequest, model_id: str) -> OrjsonResponse:
    principal = await authenticate(request)
    return OrjsonResponse(_model_object(await model_resolve(model_id, owner_id=principal.owner_id)))
