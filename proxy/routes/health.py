"""Liveness, readiness and metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from proxy.services import services

CHECK_TIMEOUT = 2.0


async def healthz(_: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _check(probe: Awaitable[object]) -> str:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            await probe
    except Exception as exc:
        return f"unavailable ({type(exc).__name__})"
    return "ok"


async def _database_ok(request: Request) -> None:
    async with services(request).engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


async def readyz(request: Request) -> Response:
    """Ready when Redis and the database answer; each check is bounded."""
    running = services(request)
    backlog = running.writer.backlog_bytes
    checks = {
        "redis": await _check(running.redis.ping()),
        "database": await _check(_database_ok(request)),
        "outbox": "full" if running.broker.outbox_full() else "ok",
    }
    ready = all(v == "ok" for v in checks.values())
    body = {"status": "ready" if ready else "degraded", **checks, "outbox_backlog_bytes": backlog}
    return JSONResponse(body, 200 if ready else 503)


async def metrics(_: Request) -> Response:
    return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
