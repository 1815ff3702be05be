"""Request bodies: JSON parsing and schema validation, with OpenAI-style 400s that name the bad parameter."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
import pydantic
from django.http import HttpRequest

from farm.errors import InvalidRequest

M = TypeVar("M", bound=pydantic.BaseModel)


def json_body(request: HttpRequest) -> dict[str, Any]:
    content_type = request.content_type or ""
    if content_type != "application/json":
        raise InvalidRequest(f"Content-Type must be application/json, not {content_type or 'missing'!r}.",
                             code="invalid_content_type")
    try:
        body = orjson.loads(request.body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {exc}.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return body


def _param(loc: tuple, all_locs: list[tuple]) -> str | None:
    """The parameter an error is about: the common path of the errors on that field, without pydantic's union
    member labels (`stop.str`, `stop.list[str]` -> `stop`)."""
    same_field = [other for other in all_locs if other[:1] == loc[:1]]
    common: list[str] = []
    for parts in zip(*same_field, strict=False):
        if len(set(parts)) > 1:
            break
        common.append(str(parts[0]))
    return ".".join(common) or None


def validate(schema: type[M], body: dict[str, Any]) -> M:
    try:
        return schema.model_validate(body)
    except pydantic.ValidationError as exc:
        errors = exc.errors(include_url=False)
        error = errors[0]
        param = _param(error["loc"], [e["loc"] for e in errors])
        if error["type"] == "extra_forbidden":
            raise InvalidRequest(f"Unrecognized request argument supplied: {param}", param=param,
                                 code="unknown_parameter") from None
        if error["type"] == "missing":
            raise InvalidRequest(f"Missing required parameter: '{param}'.", param=param,
                                 code="missing_required_parameter") from None
        message = error["msg"].removeprefix("Value error, ")
        raise InvalidRequest(f"Invalid value for '{param}': {message}", param=param, code="invalid_value") from None
