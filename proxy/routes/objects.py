"""``GET /data-sources/{id}/objects`` and ``GET /data-sources/{id}/objects/{data_object_id}``:
the DataObjects a source stored (proxy.objects), as the engine's DataObjectMetadata and
DataObject. Admin routes: the bearer token, the project's sources only, errors in the
admin shapes. (``DELETE …/objects?key=`` is erasure: proxy.routes.erasure.)"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy import objects
from proxy.errors import NotFound, ValidationFailed
from proxy.export import Row, exported
from proxy.routes import answers, params
from proxy.routes.admin import admin
from proxy.services import services
from proxy.source_rows import spec_of
from proxy.timestamps import iso_utc


def _limit(request: Request) -> int:
    given = request.query_params.get("limit")
    if given is None:
        return objects.DEFAULT_LIMIT
    if not given.isdigit() or not 1 <= int(given) <= objects.MAX_LIMIT:
        raise ValidationFailed(
            f"limit must be an integer from 1 to {objects.MAX_LIMIT}", loc=("query", "limit")
        )
    return int(given)


def _before(request: Request) -> uuid.UUID | None:
    given = request.query_params.get("before")
    if given is None:
        return None
    try:
        return uuid.UUID(given)
    except ValueError as exc:
        raise ValidationFailed("before must be a data_object_id", loc=("query", "before")) from exc


def _metadata(data_source_id: uuid.UUID, meta: objects.Metadata) -> dict[str, Any]:
    return {
        "data_object_id": str(meta.data_object_id),
        "data_source_id": str(data_source_id),
        "key": meta.key,
        "created_at": iso_utc(meta.created_at),
    }


@admin
async def list_objects(request: Request) -> Response:
    found = services(request)
    # NotFound for a source of another project, as every admin read.
    row = await found.sources.get(params.source_id(request), params.project(request))
    limit, before = _limit(request), _before(request)
    try:
        async with found.engine.connect() as conn:
            page = await objects.page(conn, row.data_source_id, limit, before)
    except objects.UnknownCursor as exc:
        raise ValidationFailed(
            "before names no data object of this source", loc=("query", "before")
        ) from exc
    return answers.json_answer([_metadata(row.data_source_id, meta) for meta in page])


@admin
async def get_object(request: Request) -> Response:
    found = services(request)
    row = await found.sources.get(params.source_id(request), params.project(request))
    data_object_id = params.path_id(request, "data_object_id")
    async with found.engine.connect() as conn:
        stored = await objects.one(conn, row.data_source_id, data_object_id)
    if stored is None:
        raise NotFound(f"no data object {data_object_id} in this data source")
    meta, raw = stored
    # Formatted as the broker answers it; a body that never parsed (kept for audit) is
    # null with its error, as `databroker export` writes it.
    item = exported(
        Row(meta.data_object_id, meta.key, meta.created_at, raw),
        spec_of(row).source.response_type,
    )
    answer = _metadata(row.data_source_id, meta)
    answer["value"] = None if item.value_json is None else orjson.Fragment(item.value_json)
    if item.error is not None:
        answer["error"] = item.error
    return answers.json_answer(answer)


routes = [
    Route("/data-sources/{data_source_id}/objects", list_objects, methods=["GET"]),
    Route("/data-sources/{data_source_id}/objects/{data_object_id}", get_object, methods=["GET"]),
]
