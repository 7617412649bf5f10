"""Liveness, readiness and metrics.

``/healthz`` and ``/readyz`` touch no dependency while answering: liveness is the
process answering at all, readiness the last background checks (proxy.readiness),
which a read of ``/readyz`` or ``/metrics`` starts again when they are old.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.metrics import scrape
from proxy.outbox import Outbox
from proxy.readiness import report
from proxy.services import services


async def healthz(_: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    running = services(request)
    running.dependencies.observe()
    status, body = report(
        running.dependencies, running.broker.outbox_full(), running.writer.backlog_bytes
    )
    return JSONResponse(body, status)


async def metrics(request: Request) -> Response:
    running = services(request)
    running.dependencies.observe()
    outbox = running.writer.outbox
    exposition = await asyncio.to_thread(_exposition, outbox)
    return Response(exposition, media_type=CONTENT_TYPE_LATEST)


def _exposition(outbox: Outbox) -> bytes:
    oldest = outbox.oldest_record_time()
    return scrape(0.0 if oldest is None else max(0.0, time.time() - oldest))


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
