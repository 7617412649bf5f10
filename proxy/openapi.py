"""``GET /openapi.json``: the broker's own routes, schemas taken from the models that validate them."""

from __future__ import annotations

from functools import cache
from typing import Any, get_args

from pydantic import TypeAdapter
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy import __version__
from proxy.messages import REQUEST_SCHEMA
from proxy.objects import MAX_LIMIT
from proxy.routes.internal import PATH as BROKER_PATH
from proxy.source_spec import DataSourceSpec
from proxy.source_store import CredentialValue, VariableValue
from proxy.types import Status

_REF = "#/components/schemas/{model}"

BROKER_RESPONSE = {
    "type": "object",
    "required": ["data_object_id", "origin", "key", "value", "start_time", "end_time", "error"],
    "properties": {
        "data_object_id": {"anyOf": [{"type": "string", "format": "uuid"}, {"type": "null"}]},
        "origin": {"anyOf": [{"enum": ["REQUEST", "CACHE"]}, {"type": "null"}]},
        "key": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "value": {},
        "start_time": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        "end_time": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        "error": {
            "anyOf": [
                {"type": "object", "required": ["code", "message"]},
                {"type": "null"},
            ]
        },
        "replay": {
            "type": "object",
            "required": ["data_object_created_at"],
            "properties": {"data_object_created_at": {"type": "string", "format": "date-time"}},
        },
    },
}
ADMIN_ERROR = {
    "type": "object",
    "required": ["detail", "code"],
    "properties": {"detail": {"type": "string"}, "code": {"type": "string"}},
}
# FastAPI's shape, which the engine's SDK parses: ``detail`` lists where and what.
VALIDATION_ERROR = {
    "type": "object",
    "required": ["detail", "code"],
    "properties": {
        "detail": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["loc", "msg", "type"],
                "properties": {
                    "loc": {
                        "type": "array",
                        "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                    },
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        },
        "code": {"const": "VALIDATION_ERROR"},
    },
}


_UUID = {"type": "string", "format": "uuid"}
# The reference's shapes of the objects and test routes.
OBJECT_METADATA: dict[str, Any] = {
    "type": "object",
    "required": ["data_object_id", "data_source_id", "key", "created_at"],
    "properties": {
        "data_object_id": _UUID,
        "data_source_id": _UUID,
        "key": {"type": "string"},
        "created_at": {"type": "string", "format": "date-time"},
    },
}
DATA_OBJECT = {
    **OBJECT_METADATA,
    "required": [*OBJECT_METADATA["required"], "value"],
    "properties": {
        **OBJECT_METADATA["properties"],
        "value": {},
        "error": {"type": "object", "required": ["code", "message"]},
    },
}
_TEXTS = {
    "anyOf": [{"type": "object", "additionalProperties": {"type": "string"}}, {"type": "null"}]
}
TEST_PARAMS = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "params": {"anyOf": [{"type": "object"}, {"type": "null"}]},
        "env_vars": _TEXTS,
    },
}
TEST_RESPONSE = {
    "type": "object",
    "required": ["test_id", "status_code", "response_time_ms"],
    "properties": {
        "test_id": _UUID,
        "request_url": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "request_headers": _TEXTS,
        "status_code": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "response_time_ms": {"type": "number"},
        "response_body": {},
        "response_headers": _TEXTS,
        "error": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
}


def _any_case(word: str) -> str:
    """A pattern for ``word`` in any case (JSON Schema patterns take no flags)."""
    return "^" + "".join(f"[{c.upper()}{c.lower()}]" for c in word) + "$"


def _json(schema: dict[str, Any] | str) -> dict[str, Any]:
    if isinstance(schema, str):
        schema = {"$ref": _REF.format(model=schema)}
    return {"content": {"application/json": {"schema": schema}}}


def _op(
    summary: str,
    ok: dict[str, Any] | str,
    body: dict[str, Any] | str | None = None,
    errors: tuple[int, ...] = (400, 401, 403, 404, 422),
    params: tuple[str, ...] = (),
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {"description": "OK", **_json(ok)},
            **{
                str(code): {
                    "description": "Error",
                    **_json(VALIDATION_ERROR if code == 422 else ADMIN_ERROR),
                }
                for code in errors
            },
        },
    }
    if body is not None:
        op["requestBody"] = {"required": True, **_json(body)}
    if params:
        op["parameters"] = [
            {
                "name": p,
                "in": "path",
                "required": True,
                "schema": {"type": "string", "format": "uuid"},
            }
            for p in params
        ]
    return op


def _dated(op: dict[str, Any]) -> dict[str, Any]:
    """An analytics operation: its window (UTC days) and project as query parameters."""
    op["parameters"] = [
        *op.get("parameters", []),
        *(
            {"name": name, "in": "query", "required": False, "schema": schema}
            for name, schema in (
                ("start_date", {"type": "string", "format": "date"}),
                ("end_date", {"type": "string", "format": "date"}),
                ("project_id", {"type": "string", "format": "uuid"}),
            )
        ),
    ]
    return op


@cache
def document() -> dict[str, Any]:
    _, defs = models_json_schema([(DataSourceSpec, "validation")], ref_template=_REF)
    schemas = defs.get("$defs", {})
    schemas["VariableValues"] = TypeAdapter(list[VariableValue]).json_schema(
        ref_template="#/components/schemas/{model}"
    )
    schemas.update(schemas["VariableValues"].pop("$defs", {}))
    schemas["CredentialValues"] = TypeAdapter(list[CredentialValue]).json_schema(
        ref_template="#/components/schemas/{model}"
    )
    schemas.update(schemas["CredentialValues"].pop("$defs", {}))
    source = "DataSourceSpec"
    one = ("data_source_id",)
    broker_errors = {
        str(status): {"description": "Error", **_json(BROKER_RESPONSE)}
        for status in (400, 403, 404, 429, 500, 502, 503)
    }
    listing = _op("List data sources", {"type": "array", "items": {"type": "object"}})
    listing["parameters"] = [
        {"name": name, "in": "query", "required": False, "schema": schema}
        for name, schema in (
            ("include_archived", {"type": "boolean"}),
            ("status", {"type": "string", "pattern": "|".join(map(_any_case, get_args(Status)))}),
            ("project_id", {"type": "string", "format": "uuid"}),
        )
    ]
    erase = _op(
        "Erase one key's DataObjects and cache entry; audit rows stay, marked erased_at",
        {"type": "object"},
        params=one,
        errors=(401, 403, 404, 422, 503),
    )
    erase["parameters"].append(
        {"name": "key", "in": "query", "required": True, "schema": {"pattern": "^[0-9a-f]{32}$"}}
    )
    objects = _op(
        "A source's DataObjects, newest first",
        {"type": "array", "items": OBJECT_METADATA},
        params=one,
    )
    objects["parameters"] += [
        {"name": name, "in": "query", "required": False, "schema": schema}
        for name, schema in (
            ("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}),
            ("before", {"type": "string", "format": "uuid"}),
            ("project_id", {"type": "string", "format": "uuid"}),
        )
    ]
    sources = {
        "get": listing,
        "post": _op("Register a data source (DRAFT)", {"type": "object"}, source),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "databroker", "version": __version__},
        "paths": {
            BROKER_PATH: {
                "post": {
                    "summary": "Fetch a data source's value, from the cache or the upstream",
                    "requestBody": {"required": True, **_json(REQUEST_SCHEMA)},
                    "responses": {
                        "200": {"description": "OK", **_json(BROKER_RESPONSE)},
                        **broker_errors,
                    },
                }
            },
            "/data-sources": sources,
            "/data-sources/": sources,
            "/data-sources/{data_source_id}": {
                "get": _op("Get a data source", {"type": "object"}, params=one),
                "put": _op("Replace a data source", {"type": "object"}, source, params=one),
                "delete": _op(
                    "Delete a draft, archive a published source", {"type": "object"}, params=one
                ),
            },
            "/data-sources/{data_source_id}/publish": {
                "post": _op("Publish a draft", {"type": "object"}, params=one)
            },
            "/data-sources/{data_source_id}/pause": {
                "post": _op("Pause upstream calls fleet-wide", {"type": "object"}, params=one)
            },
            "/data-sources/{data_source_id}/protection": {
                "get": _op(
                    "Pause, hold, spend and breaker state, fleet-wide",
                    {"type": "object"},
                    params=one,
                )
            },
            "/data-sources/{data_source_id}/resume": {
                "post": _op("Resume upstream calls fleet-wide", {"type": "object"}, params=one)
            },
            "/data-sources/{data_source_id}/variables": {
                "get": _op("Variable names and whether set", {"type": "array"}, params=one),
                "put": _op(
                    "Set the variables (desired state)",
                    {"type": "array"},
                    "VariableValues",
                    params=one,
                ),
            },
            **{
                f"/data-sources/{{data_source_id}}/{path}": {
                    "get": _dated(_op(summary, {"type": "object"}, params=one))
                }
                for path, summary in (
                    ("usage", "Requests per day"),
                    ("metrics", "Upstream latency and error rate per day"),
                    ("cache-stats", "Cache hit ratio per day"),
                )
            },
            "/analytics/summary": {
                "get": _dated(
                    _op("Hit rate, latency, error rate, top sources, spend", {"type": "object"})
                )
            },
            "/data-sources/{data_source_id}/credentials": {
                "get": _op("Credential types, values masked", {"type": "array"}, params=one),
                "put": _op(
                    "Set credentials (each given type replaced, others kept)",
                    {"type": "array"},
                    "CredentialValues",
                    params=one,
                ),
            },
            "/data-sources/{data_source_id}/objects": {"get": objects, "delete": erase},
            "/data-sources/{data_source_id}/objects/{data_object_id}": {
                "get": _op(
                    "One DataObject, its value formatted by the source's response_type",
                    DATA_OBJECT,
                    params=("data_source_id", "data_object_id"),
                )
            },
            "/data-sources/{data_source_id}/test": {
                "post": _op(
                    "Call the source once: no cache, no DataObject, secrets masked",
                    TEST_RESPONSE,
                    TEST_PARAMS,
                    params=one,
                )
            },
            "/healthz": {"get": {"summary": "Alive", "responses": {"200": {"description": "OK"}}}},
            "/readyz": {
                "get": {
                    "summary": "Redis and database reachable",
                    "responses": {
                        "200": {"description": "ready"},
                        "503": {"description": "degraded"},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {"200": {"description": "OK"}},
                }
            },
        },
        "components": {"schemas": schemas},
    }


async def openapi(_: Request) -> Response:
    return JSONResponse(document())


routes = [Route("/openapi.json", openapi, methods=["GET"])]
