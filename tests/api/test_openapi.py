"""The OpenAPI document (`/api/schema/`) and its docs UI (`/api/docs/`): valid, complete, truthful, offline.

`test_fuzz.py` checks the live responses against it."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

import orjson
import pytest
import yaml
from django.test import Client

from api.openai.chat.schema import ChatCompletionRequest
from api.openai.completions.schema import CompletionRequest
from api.schema import ERROR_COMPONENT, _path_and_parameters, _routes

# Routes that are not API operations: the document itself and its UIs.
NOT_OPERATIONS = {"/api/schema/", "/api/docs/"}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    response = Client().get("/api/schema/")
    assert response.status_code == 200
    assert response["content-type"].startswith("application/vnd.oai.openapi+json")
    return orjson.loads(response.content)


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, op)
        for path, item in document["paths"].items()
        for method, op in item.items()
        if method in ("get", "post", "put", "patch", "delete")
    ]


def test_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    from drf_spectacular.validation import validate_schema

    assert document["openapi"] == "3.1.0"
    validate_schema(document)  # raises on an invalid document
    assert all(op.get("operationId") for _, _, op in operations(document))
    ids = [op["operationId"] for _, _, op in operations(document)]
    assert len(ids) == len(set(ids))


def test_yaml_is_the_same_document(document: dict[str, Any]) -> None:
    response = Client().get("/api/schema/?format=yaml")
    assert response.status_code == 200
    assert yaml.safe_load(response.content) == document


def test_schema_and_docs_need_no_key() -> None:
    for url in ("/api/schema/", "/api/docs/"):
        assert Client().get(url).status_code == 200, url


def test_every_routed_endpoint_is_documented(document: dict[str, Any]) -> None:
    """A new endpoint that is routed but not described fails here: DRF views are found by drf-spectacular, async
    views need `@operation` (see `api/schema.py`)."""
    from django.urls import get_resolver

    routed = {_path_and_parameters(route)[0] for route, _ in _routes(get_resolver().url_patterns)}
    routed -= NOT_OPERATIONS
    assert routed, "no routes found"
    assert sorted(routed - set(document["paths"])) == []
    for path in (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/v1/models/{model_id}",
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in document["paths"], path


@pytest.mark.parametrize(
    ("path", "model"),
    [
        ("/v1/chat/completions", ChatCompletionRequest),
        ("/v1/completions", CompletionRequest),
    ],
)
def test_request_bodies_are_the_validating_pydantic_models(document: dict[str, Any], path: str, model: type) -> None:
    body = document["paths"][path]["post"]["requestBody"]
    assert body["required"] is True
    assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model.__name__}"}
    expected = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in expected.pop("$defs", {}).items():
        assert document["components"]["schemas"][name] == definition
    assert document["components"]["schemas"][model.__name__] == expected


def test_request_schemas_carry_the_validation_bounds(document: dict[str, Any]) -> None:
    chat = document["components"]["schemas"]["ChatCompletionRequest"]
    assert chat["additionalProperties"] is False
    assert chat["required"] == ["model", "messages"]
    assert chat["properties"]["max_tokens"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 1_000_000}
    assert chat["properties"]["n"] == {"anyOf": [{"const": 1}, {"type": "null"}], "default": None, "title": "N"}
    stop = chat["properties"]["stop"]["anyOf"]
    assert stop[1]["maxItems"] == 4 and stop[1]["items"]["minLength"] == 1
    assert chat["properties"]["model"]["pattern"] == "^[^\\u0000]*$"  # NUL is refused (PostgreSQL cannot store it)


def test_every_error_status_is_an_openai_error_body(document: dict[str, Any]) -> None:
    error = document["components"]["schemas"][ERROR_COMPONENT]
    assert error["required"] == ["error"]
    assert set(document["components"]["schemas"]["ErrorDetail"]["required"]) == {"message", "type", "param", "code"}
    for path, method, op in operations(document):
        for status, response in op["responses"].items():
            if int(status) >= 400 and path not in ("/readyz",):
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": f"#/components/schemas/{ERROR_COMPONENT}"}, (method, path, status)


@pytest.mark.parametrize(
    ("path", "statuses"),
    [
        ("/v1/chat/completions", {"200", "400", "401", "404", "413", "500", "503", "504"}),
        ("/v1/completions", {"200", "400", "401", "404", "413", "500", "503", "504"}),
        ("/v1/models", {"200", "401"}),
        ("/v1/jobs/{job_id}", {"200", "401", "404"}),
    ],
)
def test_each_route_documents_the_statuses_it_answers(document: dict[str, Any], path: str, statuses: set[str]) -> None:
    method = "post" if "completions" in path else "get"
    assert statuses <= set(document["paths"][path][method]["responses"])


def test_key_protected_operations_declare_bearer_auth(document: dict[str, Any]) -> None:
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for path, method, op in operations(document):
        public = path in ("/healthz", "/readyz", "/metrics")
        assert (op.get("security") in ([], None)) == public, (method, path)
        if not public:
            assert {"bearerAuth": []} in op["security"]
            assert "401" in op["responses"], (method, path)


def test_streaming_is_documented_as_server_sent_events(document: dict[str, Any]) -> None:
    content = document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletion"}
    event = content["text/event-stream"]["schema"]
    assert event["required"] == ["data"]
    done, chunk = event["properties"]["data"]["anyOf"]
    assert done == {"const": "[DONE]"}
    assert chunk["contentMediaType"] == "application/json"
    assert chunk["contentSchema"]["anyOf"] == [
        {"$ref": "#/components/schemas/ChatCompletionChunk"},
        {"$ref": f"#/components/schemas/{ERROR_COMPONENT}"},
    ]


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value and tag in ("script", "link"):
                self.urls.append(value)


def test_docs_ui_is_served_by_the_farm_itself() -> None:
    """Every script and stylesheet comes from the farm (drf-spectacular-sidecar through WhiteNoise): no CDN.
    (drf-spectacular's Redoc page loads Google Fonts, so it is not routed.)"""
    client = Client()
    response = client.get("/api/docs/")
    assert response.status_code == 200
    assert response["content-type"].startswith("text/html")
    html = response.content.decode()
    parser = _Assets()
    parser.feed(html)
    scripts = [url for url in parser.urls if url.endswith(".js")]
    assert scripts, html[:2000]
    for url in parser.urls:
        assert not re.match(r"^(https?:)?//", url), f"{url} is loaded from outside the farm"
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert len(b"".join(asset.streaming_content) if asset.streaming else asset.content) > 100, url
    assert "/api/schema/" in html
