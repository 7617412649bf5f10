"""``GET|PUT /data-sources/{id}/credentials``: the secrets ``source.auth`` uses.

Admin routes like the others (``proxy.routes.admin``: same token, project scope and
error shapes). Values are encrypted at rest (``proxy.secrets``) and every answer shows
``"********"`` in their place, as the engine does.
"""

from __future__ import annotations

from pydantic import TypeAdapter
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.routes import answers, params
from proxy.routes.admin import admin
from proxy.services import services
from proxy.source_store import CredentialValue

_CREDENTIALS = TypeAdapter(list[CredentialValue])


@admin
async def get_credentials(request: Request) -> Response:
    return answers.json_answer(
        await params.store(request).get_credentials(
            params.source_id(request), params.project(request)
        )
    )


@admin
async def set_credentials(request: Request) -> Response:
    given = await params.parse_body(request, _CREDENTIALS.validate_python)
    data_source_id, project = params.source_id(request), params.project(request)
    await params.store(request).set_credentials(data_source_id, given, project)
    await services(request).registry.changed(data_source_id)
    # The cached token was issued for the old credentials. (Another sidecar that has not
    # reloaded yet may still request one with them: it lasts until it expires.)
    await services(request).broker.tokens.forget(data_source_id)
    return answers.json_answer(await params.store(request).get_credentials(data_source_id, project))


routes = [
    Route("/data-sources/{data_source_id}/credentials", get_credentials, methods=["GET"]),
    Route("/data-sources/{data_source_id}/credentials", set_credentials, methods=["PUT"]),
]
