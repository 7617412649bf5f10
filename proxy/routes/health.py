"""Liveness, readiness and metrics.

``/healthz`` and ``/readyz`` touch no dependency while answering: liveness is the
process answering at all, readiness the last background checks (proxy.readiness).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from proxy.readiness import report
from proxy.services import services


async def healthz(_: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    running = services(request)
    status, body = report(
        running.dependencies, running.broker.outbox_full(), running.writer.backlog_bytes
    )
    return JSONResponse(body, status)


async def metrics(_: Request) -> Response:
    return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
