"""``DELETE /data-sources/{id}/objects?key=KEY``: erase one key's DataObjects and cache entry
(proxy.erasure). An admin route: the bearer token, the project's sources only, errors in
the admin shape, read through proxy.routes.params and answered through
proxy.routes.answers."""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.errors import ValidationFailed
from proxy.routes import answers, params
from proxy.routes.admin import admin
from proxy.services import services

# make_cache_key's md5, as hex: anything else names no object.
_KEY = re.compile(r"[0-9a-f]{32}")


@admin
async def erase_objects(request: Request) -> Response:
    key = request.query_params.get("key", "")
    if not _KEY.fullmatch(key):
        raise ValidationFailed("key must be a cache key: 32 lowercase hexadecimal digits")
    found = services(request)
    # NotFound for a source of another project, as every admin route.
    row = await found.sources.get(params.source_id(request), params.project(request))
    erased = await found.eraser.erase(row.data_source_id, key)
    return answers.json_answer(
        {
            "data_source_id": str(row.data_source_id),
            "key": key,
            "data_objects_erased": len(erased.data_object_ids),
            "audit_rows_marked": erased.audit_rows,
        }
    )


routes = [Route("/data-sources/{data_source_id}/objects", erase_objects, methods=["DELETE"])]
