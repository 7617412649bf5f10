"""``POST /data-sources/{id}/test`` (proxy.tryout): an admin route — the bearer token, the
project's sources only, errors in the admin shapes."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy import tryout
from proxy.errors import NotFound
from proxy.routes import answers, params
from proxy.routes.admin import admin
from proxy.services import services


@admin
async def test_source(request: Request) -> Response:
    given: tryout.TestParams = await params.parse_body(request, tryout.TestParams.model_validate)
    found = services(request)
    # NotFound for a source of another project, as every admin route.
    row = await found.sources.get(params.source_id(request), params.project(request))
    try:
        source = await found.registry.by_id(row.data_source_id, row.last_updated_at.timestamp())
    except KeyError as exc:  # deleted since it was read
        raise NotFound(f"no data source {row.data_source_id} in this project") from exc
    source = tryout.with_overrides(source, given.env_vars or {})
    return answers.json_answer(await tryout.run(found.broker, source, given.params or {}))


routes = [Route("/data-sources/{data_source_id}/test", test_source, methods=["POST"])]
