"""The analytics routes: a source's usage, metrics and cache statistics, and a project's summary.

Admin routes (same token, same project scoping, same error shapes as
``proxy.routes.admin``) that read the daily rollup (``proxy.rollup``), never the
audit table, so a window's cost does not grow with the requests it saw. The
figures themselves are ``proxy.analytics``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy import analytics, rollup_reads
from proxy.routes import answers, params
from proxy.routes.admin import admin
from proxy.services import services

Figures = Callable[[list[analytics.Counter], analytics.Window, analytics.Cost | None], Any]


def _window(request: Request) -> analytics.Window:
    query = request.query_params
    today = datetime.now(UTC).date()
    return analytics.window(query.get("start_date"), query.get("end_date"), today)


def _per_source(figures: Figures) -> Callable[[Request], Any]:
    @admin
    async def route(request: Request) -> Response:
        found = services(request)
        data_source_id, window = params.source_id(request), _window(request)
        # 404 for a source of another project, as every admin read.
        row = await found.sources.get(data_source_id, params.project(request))
        async with found.engine.connect() as conn:
            counters = await rollup_reads.read_source(
                conn, data_source_id, window.start, window.end
            )
        return answers.json_answer(figures(counters, window, analytics.cost_of(row.source)))

    return route


@admin
async def summary(request: Request) -> Response:
    found, window, project = services(request), _window(request), params.project(request)
    rows = await found.sources.list_sources(project, True, None)
    sources = {
        row.data_source_id: analytics.SourceInfo(row.name, analytics.cost_of(row.source))
        for row in rows
    }
    async with found.engine.connect() as conn:
        whole, ranked = await rollup_reads.read_project(conn, project, window.start, window.end)
    return answers.json_answer(analytics.summary(whole, ranked, window, project, sources))


routes = [
    Route(
        "/data-sources/{data_source_id}/usage",
        _per_source(analytics.usage),
        methods=["GET"],
    ),
    Route(
        "/data-sources/{data_source_id}/metrics",
        _per_source(lambda counters, window, _: analytics.metrics(counters, window)),
        methods=["GET"],
    ),
    Route(
        "/data-sources/{data_source_id}/cache-stats",
        _per_source(lambda counters, window, _: analytics.cache_stats(counters, window)),
        methods=["GET"],
    ),
    Route("/analytics/summary", summary, methods=["GET"]),
]
