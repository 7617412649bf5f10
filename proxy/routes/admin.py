"""The admin routes: register, change, publish and delete data sources and set variables.

Bodies and answers follow the reference OpenAPI. Every route needs
``Authorization: Bearer $DATABROKER_ADMIN_TOKEN``; with no token configured
the admin surface is off (403). Every failure answers ``{"detail", "code"}``
JSON, whatever raised it: a request that is not the route's shape 422 with
``detail`` in FastAPI's list shape, other refusals 400 with ``detail`` a message
(the engine's SDK reads only these). Validation errors never echo input values,
since a variable's value is a secret.

Each request works in one project: ``?project_id=``, else the body's
``project_id``, else ``DATABROKER_PROJECT_ID``, else the global namespace. A
source of another project does not exist for it (404), reads included.
"""

from __future__ import annotations

import hmac
import logging
import traceback
from collections.abc import Awaitable, Callable
from typing import get_args

from pydantic import TypeAdapter
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.database import describe, is_unavailable
from proxy.errors import (
    AdminDisabled,
    BrokerError,
    DatabaseUnavailable,
    InternalError,
    Unauthorized,
    ValidationFailed,
)
from proxy.routes import answers, params
from proxy.services import services
from proxy.source_rows import spec_of
from proxy.source_spec import DataSourceSpec
from proxy.source_store import VariableValue, to_api
from proxy.types import Status

logger = logging.getLogger("databroker.admin")

Handler = Callable[[Request], Awaitable[Response]]
_VARIABLES = TypeAdapter(list[VariableValue])


def _authorize(request: Request) -> None:
    token = services(request).settings.admin_token
    if token is None:
        raise AdminDisabled("admin routes are off: set DATABROKER_ADMIN_TOKEN to enable them")
    given = request.headers.get("authorization", "")
    expected = f"Bearer {token.get_secret_value()}"
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise Unauthorized("missing or wrong bearer token")


def admin(handler: Handler) -> Handler:
    """Authorize, then answer every failure as ``{"detail", "code"}``: an unexpected one
    as 500 INTERNAL (logged), a database that is away or too slow as 503."""

    async def guarded(request: Request) -> Response:
        try:
            _authorize(request)
            return await handler(request)
        except BrokerError as exc:
            return answers.error_answer(exc)
        except ClientDisconnect:
            return answers.error_answer(ValidationFailed("the client left before sending its body"))
        except Exception as exc:
            if is_unavailable(exc):
                return answers.error_answer(DatabaseUnavailable(f"{describe(exc)}; retry"))
            # Where, not what: an exception's message may quote a value it was given.
            where = "".join(traceback.format_tb(exc.__traceback__))
            logger.error(
                "admin %s %s failed: %s at\n%s",
                request.method,
                request.url.path,
                type(exc).__name__,
                where,
            )
            return answers.error_answer(InternalError(f"internal error ({type(exc).__name__})"))

    return guarded


_BOOLEANS = {
    **dict.fromkeys(("true", "1", "yes", "on", "t", "y"), True),
    **dict.fromkeys(("false", "0", "no", "off", "f", "n"), False),
}


@admin
async def list_sources(request: Request) -> Response:
    status = request.query_params.get("status")
    if status is not None:
        status = status.upper()  # the engine's enum, any case
        if status not in get_args(Status):
            raise ValidationFailed(
                f"status must be one of {', '.join(get_args(Status))}", loc=("query", "status")
            )
    # The words FastAPI reads as a boolean, as the engine takes them.
    include_archived = _BOOLEANS.get(request.query_params.get("include_archived", "false").lower())
    if include_archived is None:
        raise ValidationFailed(
            "include_archived must be true or false", loc=("query", "include_archived")
        )
    rows = await params.store(request).list_sources(
        params.project(request),
        include_archived,
        status,  # type: ignore[arg-type]
    )
    return answers.json_answer([to_api(row) for row in rows])


@admin
async def create_source(request: Request) -> Response:
    spec = await params.parse_body(request, DataSourceSpec.model_validate)
    row = await params.store(request).create(spec, params.project(request, spec.project_id))
    await services(request).registry.changed(row.data_source_id)
    return answers.json_answer(to_api(row))


@admin
async def get_source(request: Request) -> Response:
    return answers.json_answer(
        to_api(await params.store(request).get(params.source_id(request), params.project(request)))
    )


@admin
async def replace_source(request: Request) -> Response:
    spec = await params.parse_body(request, DataSourceSpec.model_validate)
    row = await params.store(request).replace(
        params.source_id(request), spec, params.project(request, spec.project_id)
    )
    # Committed: from here on nothing may answer as if it were not.
    if row.status == "DRAFT":
        # A draft's templates may have changed: its cached answers are no longer its answers.
        # Never raises: a flush Redis refuses is retried in the background (proxy.flushes).
        await services(request).flushes.flush_source(row.data_source_id)
    await services(request).registry.changed(row.data_source_id)
    return answers.json_answer(to_api(row))


@admin
async def delete_source(request: Request) -> Response:
    data_source_id = params.source_id(request)
    await params.store(request).delete(data_source_id, params.project(request))
    await services(request).registry.changed(data_source_id)
    return answers.json_answer({"data_source_id": str(data_source_id)})


@admin
async def publish_source(request: Request) -> Response:
    row = await params.store(request).publish(params.source_id(request), params.project(request))
    await services(request).registry.changed(row.data_source_id)
    return answers.json_answer(to_api(row))


@admin
async def get_variables(request: Request) -> Response:
    return answers.json_answer(
        await params.store(request).get_variables(
            params.source_id(request), params.project(request)
        )
    )


@admin
async def set_variables(request: Request) -> Response:
    desired = await params.parse_body(request, _VARIABLES.validate_python)
    data_source_id, project = params.source_id(request), params.project(request)
    await params.store(request).set_variables(data_source_id, desired, project)
    await services(request).registry.changed(data_source_id)
    return answers.json_answer(await params.store(request).get_variables(data_source_id, project))


async def _set_paused(request: Request, paused: bool) -> Response:
    """Pause or resume a source on every sidecar (``proxy.vendor_state``): its upstream calls
    answer 503 SOURCE_PAUSED within a second fleet-wide; its cache hits are still served."""
    row = await params.store(request).get(params.source_id(request), params.project(request))
    await services(request).broker.vendors.set_paused(row.data_source_id, paused)
    return answers.json_answer({**to_api(row), "paused": paused})


@admin
async def get_protection(request: Request) -> Response:
    """The source's spend and vendor protection as the fleet holds it now: paused, held by
    an upstream's 429, spent against its budget, its breaker's state."""
    row = await params.store(request).get(params.source_id(request), params.project(request))
    described = await services(request).broker.vendors.describe(
        row.data_source_id, spec_of(row).source
    )
    return answers.json_answer({"data_source_id": str(row.data_source_id), **described})


@admin
async def pause_source(request: Request) -> Response:
    return await _set_paused(request, True)


@admin
async def resume_source(request: Request) -> Response:
    return await _set_paused(request, False)


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
    Route("/data-sources/{data_source_id}/pause", pause_source, methods=["POST"]),
    Route("/data-sources/{data_source_id}/protection", get_protection, methods=["GET"]),
    Route("/data-sources/{data_source_id}/resume", resume_source, methods=["POST"]),
]
