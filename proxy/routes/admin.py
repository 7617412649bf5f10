"""The admin routes: register, change, publish and delete data sources and set variables.

Bodies and answers follow the reference OpenAPI. Every route needs
``Authorization: Bearer $DATABROKER_ADMIN_TOKEN``; with no token configured
the admin surface is off (403). Validation errors never echo input values,
since a variable's value is a secret.
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, get_args

import orjson
from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.cache import CacheUnavailable
from proxy.errors import AdminDisabled, AdminError, NotFound, Unauthorized, ValidationFailed
from proxy.messages import loads_strict
from proxy.routes.bodies import read_json
from proxy.source_spec import DataSourceSpec
from proxy.source_store import SourceStore, VariableValue, to_api
from proxy.types import Status

Handler = Callable[[Request], Awaitable[Response]]
_VARIABLES = TypeAdapter(list[VariableValue])


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type="application/json")


def _authorize(request: Request) -> None:
    token = request.state.settings.admin_token
    if token is None:
        raise AdminDisabled("admin routes are off: set DATABROKER_ADMIN_TOKEN to enable them")
    given = request.headers.get("authorization", "")
    expected = f"Bearer {token.get_secret_value()}"
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized("missing or wrong bearer token")


def admin(handler: Handler) -> Handler:
    """Authorize, then answer AdminErrors as ``{"detail", "code"}``."""

    async def guarded(request: Request) -> Response:
        try:
            _authorize(request)
            return await handler(request)
        except AdminError as exc:
            return _json({"detail": exc.message, "code": exc.code, **exc.extra}, exc.status)

    return guarded


async def _parse(request: Request, validate: Callable[[Any], Any]) -> Any:
    """Read and validate a body: the same strict JSON as the broker route, then the model."""
    body = await read_json(request.scope, request.receive, ValidationFailed)
    try:
        data = loads_strict(body)
    except ValueError as exc:
        raise ValidationFailed(str(exc)) from exc
    try:
        return validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False, include_context=False)
        raise ValidationFailed(
            "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errors),
            errors=[{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors],
        ) from exc


def _source_id(request: Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.path_params["data_source_id"])
    except ValueError as exc:
        raise NotFound("data_source_id is not a UUID") from exc


def _store(request: Request) -> SourceStore:
    store: SourceStore = request.state.sources
    return store


def _project(request: Request) -> uuid.UUID | None:
    given = request.query_params.get("project_id")
    if given is None:
        project: uuid.UUID | None = request.state.settings.project_id
        return project
    try:
        return uuid.UUID(given)
    except ValueError as exc:
        raise ValidationFailed("project_id is not a UUID") from exc


@admin
async def list_sources(request: Request) -> Response:
    status = request.query_params.get("status")
    if status is not None and status not in get_args(Status):
        raise ValidationFailed(f"status must be one of {', '.join(get_args(Status))}")
    include_archived = request.query_params.get("include_archived", "false").lower()
    if include_archived not in ("true", "false"):
        raise ValidationFailed("include_archived must be true or false")
    rows = await _store(request).list_sources(
        _project(request),
        include_archived == "true",
        status,  # type: ignore[arg-type]
    )
    return _json([to_api(row) for row in rows])


@admin
async def create_source(request: Request) -> Response:
    spec = await _parse(request, DataSourceSpec.model_validate)
    row = await _store(request).create(spec, request.state.settings.project_id)
    await request.state.registry.changed(row.data_source_id)
    return _json(to_api(row))


@admin
async def get_source(request: Request) -> Response:
    return _json(to_api(await _store(request).get(_source_id(request))))


@admin
async def replace_source(request: Request) -> Response:
    spec = await _parse(request, DataSourceSpec.model_validate)
    row = await _store(request).replace(
        _source_id(request), spec, request.state.settings.project_id
    )
    if row.status == "DRAFT":
        # A draft's templates may have changed: its cached answers are no longer its answers.
        try:
            await request.state.cache.flush_source(row.data_source_id)
        except CacheUnavailable:
            raise AdminError("draft saved, but its cache could not be flushed; retry") from None
    await request.state.registry.changed(row.data_source_id)
    return _json(to_api(row))


@admin
async def delete_source(request: Request) -> Response:
    data_source_id = _source_id(request)
    await _store(request).delete(data_source_id)
    await request.state.registry.changed(data_source_id)
    return _json({"data_source_id": str(data_source_id)})


@admin
async def publish_source(request: Request) -> Response:
    row = await _store(request).publish(_source_id(request))
    await request.state.registry.changed(row.data_source_id)
    return _json(to_api(row))


@admin
async def get_variables(request: Request) -> Response:
    return _json(await _store(request).get_variables(_source_id(request)))


@admin
async def set_variables(request: Request) -> Response:
    desired = await _parse(request, _VARIABLES.validate_python)
    data_source_id = _source_id(request)
    await _store(request).set_variables(data_source_id, desired)
    await request.state.registry.changed(data_source_id)
    return _json(await _store(request).get_variables(data_source_id))


routes = [
    # Both spellings answer directly: the reference SDK calls "/data-sources/" and
    # does not follow redirects.
    *(Route(path, list_sources, methods=["GET"]) for path in ("/data-sources", "/data-sources/")),
    *(Route(path, create_source, methods=["POST"]) for path in ("/data-sources", "/data-sources/")),
    Route("/data-sources/{data_source_id}", get_source, methods=["GET"]),
    Route("/data-sources/{data_source_id}", replace_source, methods=["PUT"]),
    Route("/data-sources/{data_source_id}", delete_source, methods=["DELETE"]),
    Route("/data-sources/{data_source_id}/publish", publish_source, methods=["POST"]),
    Route("/data-sources/{data_source_id}/variables", get_variables, methods=["GET"]),
    Route("/data-sources/{data_source_id}/variables", set_variables, methods=["PUT"]),
]
