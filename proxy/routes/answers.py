"""How every route outside the hot path answers: JSON, and each failure as
``{"detail", "code"}``, Starlette's own refusals (no such route, method not allowed)
included. Imported at start-up, unlike the admin routes' modules (``proxy.routes.deferred``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from proxy.errors import BrokerError, InternalError, ValidationFailed


def json_answer(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def error_answer(exc: BrokerError) -> Response:
    detail = exc.errors if isinstance(exc, ValidationFailed) else exc.message
    return json_answer({"detail": detail, "code": exc.code, **exc.extra}, exc.status)


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "HTTP_ERROR")
    return json_answer({"detail": exc.detail, "code": code}, exc.status_code, exc.headers)


async def _internal_error(_: Request, exc: Exception) -> Response:
    return error_answer(InternalError(f"internal error ({type(exc).__name__})"))


# For the whole application.
exception_handlers = {HTTPException: _http_error, Exception: _internal_error}
