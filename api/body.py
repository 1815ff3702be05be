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
        raise InvalidRequest(
            f"Content-Type must be application/json, not {content_type or 'missing'!r}.", code="invalid_content_type"
        )
    try:
        body = orjson.loads(request.body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {exc}.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    _refuse_nul(body)
    return body


def _refuse_nul(body: dict[str, Any]) -> None:
    """U+0000 anywhere in a body (keys too) is a 400 naming where: PostgreSQL cannot store it in a JSON or text
    column, so it would fail later as a database error. Iterative: orjson accepts 1,024 levels of nesting."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                raise InvalidRequest(
                    f"Invalid value for '{path}': NUL characters (\\u0000) are not allowed.",
                    param=path or None,
                    code="invalid_value",
                )
        elif isinstance(value, dict):
            for key, item in value.items():
                name = f"{path}.{key}" if path else str(key)
                if "\x00" in key:
                    raise InvalidRequest(
                        "NUL characters (\\u0000) are not allowed in keys.", param=path or None, code="invalid_value"
                    )
                stack.append((name, item))
        elif isinstance(value, list):
            stack.extend((f"{path}.{index}", item) for index, item in enumerate(value))


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
        # A union field (`content: str | list[part]`) fails once per member: a member whose type matched but whose
        # value was refused (`value_error`, e.g. a NUL character) says more than "should be a valid string".
        error = next(
            (e for e in errors if e["type"] == "value_error" and e["loc"][:1] == errors[0]["loc"][:1]), errors[0]
        )
        param = _param(error["loc"], [e["loc"] for e in errors])
        if error["type"] == "extra_forbidden":
            raise InvalidRequest(
                f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter"
            ) from None
        if error["type"] == "missing":
            raise InvalidRequest(
                f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
            ) from None
        message = error["msg"].removeprefix("Value error, ")
        raise InvalidRequest(f"Invalid value for '{param}': {message}", param=param, code="invalid_value") from None
