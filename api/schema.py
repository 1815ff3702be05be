"""The OpenAPI 3.1 document of every HTTP endpoint: `/api/schema/` (JSON, `?format=yaml` for YAML), with an offline
docs UI at `/api/docs/` (Swagger UI; its assets come from `drf-spectacular-sidecar` through WhiteNoise, no CDN).

How an endpoint gets into the document (one place, next to the view):

- **DRF views** (`@api_view`, `APIView`) are found by drf-spectacular. Describe what they return with
  `@extend_schema(responses={200: MySerializer, **error_responses(401, 404)})`; `error_responses` gives the OpenAI
  error body for each status the view can answer.
- **Async plain-Django views** (the OpenAI families, health, metrics) put `@operation(...)` on the view (above or
  below `@openai_endpoint`). The request body is the pydantic model the view validates with (its
  `model_json_schema()` is the schema, so the document cannot drift from the validation); responses are pydantic
  models or raw JSON Schema per media type; `errors=(...)` lists the statuses that answer an OpenAI error body.
  The path and its parameters come from `api/urls.py`: routing the view is all it takes to publish it.

`add_registered_operations` (a drf-spectacular post-processing hook, see `SPECTACULAR_SETTINGS`) merges the second
kind into the document drf-spectacular builds for the first.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from django.urls import URLPattern, URLResolver, get_resolver
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.renderers import (
    OpenApiJsonRenderer,
    OpenApiJsonRenderer2,
    OpenApiYamlRenderer,
    OpenApiYamlRenderer2,
)
from drf_spectacular.views import SpectacularAPIView
from pydantic import BaseModel

SECURITY_SCHEME = "bearerAuth"
BEARER_SCHEME: dict[str, str] = {
    "type": "http",
    "scheme": "bearer",
    "description": "A farm API key: `Authorization: Bearer farm-...`.",
}
ERROR_COMPONENT = "Error"

# What each error status means on this API (the OpenAI meaning where OpenAI has one).
ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "Invalid request: unreadable body, wrong content type, invalid parameter, or prompt too long for the model.",
    401: "Missing or invalid API key.",
    403: "The key may not use this model or resource.",
    404: "Unknown model, resource or URL.",
    405: "Method not allowed (see the Allow header).",
    409: "The resource is in a state that does not allow this.",
    413: "Request body over the size limit (FARM_MAX_BODY_BYTES).",
    429: "Rate limit or quota exceeded (see Retry-After).",
    500: "Unexpected server error.",
    503: "No live worker serves the model, or a dependency is down (see Retry-After).",
    504: "The request's deadline passed before the model finished.",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body: every API error has this shape."""

    error: ErrorDetail


@dataclass(frozen=True)
class EventStream:
    """A `text/event-stream` body: `data: <chunk JSON>` events (or an OpenAI error event), then `data: [DONE]`.

    Documented per event (OpenAPI 3.1 reads `schema` of an event stream as one event): `data` is the JSON text of
    `chunk` or of the error body (`contentMediaType` + `contentSchema`), or the `[DONE]` sentinel."""

    chunk: type[BaseModel]


Body = type[BaseModel] | EventStream | Mapping[str, Any]


@dataclass(frozen=True)
class Response:
    description: str
    content: Mapping[str, Body] = field(default_factory=dict)  # media type -> pydantic model or raw JSON Schema
    headers: Mapping[str, str] = field(default_factory=dict)  # header name -> description


@dataclass(frozen=True)
class Operation:
    """One method of one async view, as it appears in the document."""

    method: str
    operation_id: str
    summary: str
    tags: tuple[str, ...]
    request: type[BaseModel] | None
    responses: Mapping[int, Response]
    errors: tuple[int, ...]
    auth: bool
    description: str = ""


V = TypeVar("V", bound=Callable[..., Any])


def operation(
    *,
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"],
    operation_id: str,
    summary: str,
    tags: tuple[str, ...],
    responses: Mapping[int, Response],
    request: type[BaseModel] | None = None,
    errors: tuple[int, ...] = (),
    auth: bool = True,
    description: str = "",
) -> Callable[[V], V]:
    """Declares one operation of an async plain-Django view (its path comes from `api/urls.py`)."""

    def decorate(view: V) -> V:
        declared = getattr(view, "openapi_operations", ())
        view.openapi_operations = (
            *declared,
            Operation(  # type: ignore[attr-defined]
                method=method,
                operation_id=operation_id,
                summary=summary,
                tags=tags,
                request=request,
                responses=responses,
                errors=errors,
                auth=auth,
                description=description,
            ),
        )
        return view

    return decorate


def error_ref() -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{ERROR_COMPONENT}"}


def error_responses(*statuses: int) -> dict[int, Any]:
    """For DRF views' `@extend_schema(responses=...)`: the OpenAI error body for each status."""
    from drf_spectacular.utils import OpenApiResponse

    return {
        status: OpenApiResponse(response=error_ref(), description=ERROR_DESCRIPTIONS[status]) for status in statuses
    }


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    """`api.auth.ApiKeyAuthentication` in the document: `Authorization: Bearer <key>`."""

    target_class = "api.auth.ApiKeyAuthentication"
    name = SECURITY_SCHEME

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return dict(BEARER_SCHEME)


# -- building the document ---------------------------------------------------------------------------------------------

_CONVERTER_SCHEMAS: dict[str, dict[str, Any]] = {
    "str": {"type": "string", "pattern": "^[^/]+$"},
    "path": {"type": "string", "minLength": 1},
    "int": {"type": "integer", "minimum": 0},
    "slug": {"type": "string", "pattern": "^[-a-zA-Z0-9_]+$"},
    "uuid": {"type": "string", "format": "uuid"},
}
_ROUTE_PARAM = re.compile(r"<(?:(?P<converter>\w+):)?(?P<name>\w+)>")


def _routes(patterns: list[Any], prefix: str = "") -> Iterator[tuple[str, Callable[..., Any]]]:
    """(route, view) for every plain route; regex routes and included apps (admin) are not API endpoints."""
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            if getattr(pattern, "app_name", None) == "admin":
                continue
            yield from _routes(pattern.url_patterns, prefix + str(pattern.pattern))
        elif isinstance(pattern, URLPattern) and not getattr(pattern.pattern, "regex_pattern", False):
            route = getattr(pattern.pattern, "_route", None)
            if route is not None:
                yield prefix + route, pattern.callback


def _path_and_parameters(route: str) -> tuple[str, list[dict[str, Any]]]:
    parameters = [
        {
            "name": m["name"],
            "in": "path",
            "required": True,
            "schema": dict(_CONVERTER_SCHEMAS.get(m["converter"] or "str", {"type": "string"})),
        }
        for m in _ROUTE_PARAM.finditer(route)
    ]
    return "/" + _ROUTE_PARAM.sub(lambda m: "{" + m["name"] + "}", route), parameters


class _Components:
    """Collects pydantic models' JSON Schemas into `components.schemas`."""

    def __init__(self, schemas: dict[str, Any]) -> None:
        self.schemas = schemas

    def ref(self, model: type[BaseModel], mode: Literal["validation", "serialization"]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
        for name, definition in [*schema.pop("$defs", {}).items(), (model.__name__, schema)]:
            existing = self.schemas.setdefault(name, definition)
            if existing != definition:  # two different schemas under one name: one document would lie
                raise ValueError(f"OpenAPI component {name!r} is defined twice, differently: rename one model")
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    def body(self, body: Body, mode: Literal["validation", "serialization"]) -> dict[str, Any]:
        if isinstance(body, type) and issubclass(body, BaseModel):
            return self.ref(body, mode)
        if isinstance(body, EventStream):
            payload = {"anyOf": [self.ref(body.chunk, "serialization"), error_ref()]}
            return {
                "type": "object",
                "required": ["data"],
                "description": EventStream.__doc__,
                "properties": {
                    "event": {"type": "string"},
                    "id": {"type": "string"},
                    "data": {
                        "anyOf": [
                            {"const": "[DONE]"},
                            {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
                        ]
                    },
                },
            }
        return dict(body)


def _operation_object(op: Operation, parameters: list[dict[str, Any]], components: _Components) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, response in op.responses.items():
        entry: dict[str, Any] = {"description": response.description}
        if response.content:
            entry["content"] = {
                media: {"schema": components.body(body, "serialization")} for media, body in response.content.items()
            }
        if response.headers:
            entry["headers"] = {
                name: {"description": text, "schema": {"type": "string"}} for name, text in response.headers.items()
            }
        responses[str(status)] = entry
    for status in op.errors:
        entry = {"description": ERROR_DESCRIPTIONS[status], "content": {"application/json": {"schema": error_ref()}}}
        if status in (429, 503):
            entry["headers"] = {
                "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}}
            }
        responses[str(status)] = entry
    result: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": list(op.tags),
        "responses": responses,
    }
    if op.description:
        result["description"] = op.description
    if parameters:
        result["parameters"] = parameters
    if op.request is not None:
        result["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": components.body(op.request, "validation")}},
        }
    result["security"] = [{SECURITY_SCHEME: []}] if op.auth else []
    return result


def add_registered_operations(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    """drf-spectacular post-processing hook: adds every routed view's `@operation`s to the document."""
    components = result.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    collector = _Components(schemas)
    collector.ref(ErrorResponse, "serialization")
    schemas[ERROR_COMPONENT] = schemas.pop(ErrorResponse.__name__)
    components.setdefault("securitySchemes", {})[SECURITY_SCHEME] = dict(BEARER_SCHEME)
    paths = result.setdefault("paths", {})
    for item in paths.values():  # drf-spectacular's operations (DRF views)
        for op in item.values():
            if not isinstance(op, dict):
                continue
            for parameter in op.get("parameters", []):
                # DRF reads an empty optional query parameter (`?after=`) as an absent one; say so.
                if parameter.get("in") == "query" and not parameter.get("required"):
                    parameter["allowEmptyValue"] = True
            if {SECURITY_SCHEME: []} in op.get("security", []):  # a key-protected one can always answer 401
                op["responses"].setdefault(
                    "401",
                    {"description": ERROR_DESCRIPTIONS[401], "content": {"application/json": {"schema": error_ref()}}},
                )
    for route, view in _routes(get_resolver().url_patterns):
        operations: tuple[Operation, ...] = getattr(view, "openapi_operations", ())
        if not operations:
            continue
        path, parameters = _path_and_parameters(route)
        for op in operations:
            paths.setdefault(path, {})[op.method.lower()] = _operation_object(op, parameters, collector)
    result["paths"] = dict(sorted(paths.items()))
    return result


class SchemaView(SpectacularAPIView):
    """`GET /api/schema/`: JSON by default (`?format=yaml` or `Accept: application/vnd.oai.openapi` for YAML)."""

    renderer_classes = [OpenApiJsonRenderer, OpenApiJsonRenderer2, OpenApiYamlRenderer, OpenApiYamlRenderer2]
