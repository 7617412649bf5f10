"""What every admin route reads from its request: one owner for the route modules
(admin, credentials, objects, erasure, analytics, tryout); ``proxy.routes.answers``
says how they answer.

Each request works in one project: ``?project_id=``, else the body's ``project_id``,
else ``DATABROKER_PROJECT_ID``, else the global namespace.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request

from proxy.errors import BodyTooLarge, NotFound, Refused, ValidationFailed
from proxy.messages import loads_strict
from proxy.routes.bodies import read_json
from proxy.services import services
from proxy.source_store import SourceStore


async def parse_body(request: Request, validate: Callable[[Any], Any]) -> Any:
    """Read and validate a body: the same strict JSON as the broker route, then the model."""
    body = await read_json(request.scope, request.receive, ValidationFailed, BodyTooLarge)
    try:
        data = loads_strict(body)
    except ValueError as exc:
        message = str(exc)
        raise ValidationFailed(
            message, errors=[{"loc": ["body"], "msg": message, "type": "json_invalid"}]
        ) from exc
    try:
        return validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False, include_context=False)
        raise ValidationFailed(
            "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errors),
            errors=[
                {"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in errors
            ],
        ) from exc


def path_id(request: Request, name: str) -> uuid.UUID:
    """An id in the route's path: one that is not a UUID names nothing (404)."""
    try:
        return uuid.UUID(request.path_params[name])
    except ValueError as exc:
        raise NotFound(f"{name} is not a UUID") from exc


def source_id(request: Request) -> uuid.UUID:
    return path_id(request, "data_source_id")


def store(request: Request) -> SourceStore:
    return services(request).sources


def project(request: Request, in_body: uuid.UUID | None = None) -> uuid.UUID | None:
    """The project the request works in (see the module's docstring)."""
    given = request.query_params.get("project_id")
    if given is None:
        return in_body or services(request).settings.project_id
    try:
        project = uuid.UUID(given)
    except ValueError as exc:
        raise ValidationFailed("project_id is not a UUID", loc=("query", "project_id")) from exc
    if in_body is not None and in_body != project:
        raise Refused("project_id in the body differs from ?project_id=")
    return project
