"""``X-Request-ID``: taken from the request (or made), echoed in the answer, bound to every
log line about the request; and the access log, one line per request when it is on.

The outermost ASGI layer, so every route has it, the broker's hot path included.
Its cost there is a header scan, an id and a wrapped ``send`` (``python -m
bench.request_ids``); the access line is built only when its logger is enabled.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.logs import ACCESS_LOGGER, CURRENT, RequestContext

HEADER = b"x-request-id"
# What a tracing id looks like (UUIDs, hex, base64, dotted or colon-separated ids): nothing
# that could forge a second field or line in a text log. Anything else is replaced.
_ACCEPTED = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")

access = logging.getLogger(ACCESS_LOGGER)


class _Ids:
    """New ids: a random prefix per process and a counter, 32 hex digits. Unique, which is
    all an id must be, at a fraction of ``os.urandom``'s system call per request (5 µs of
    a hit's 82 µs of CPU, ``python -m bench --profile``)."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._count = itertools.count()

    def new(self) -> str:
        return f"{self._prefix}{next(self._count) & 0xFFFFFFFFFFFFFFFF:016x}"


_ids = _Ids()


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The caller's ``X-Request-ID`` if it is an acceptable id, else a new one."""
    for name, value in headers:
        if name == HEADER:
            if _ACCEPTED.fullmatch(value):
                return value.decode("ascii")
            break
    return _ids.new()


class RequestIds:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        context = RequestContext(request_id(scope["headers"]))
        echoed = (HEADER, context.request_id.encode("ascii"))
        status = 0  # no answer started: the client left first

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), echoed]
            await send(message)

        token = CURRENT.set(context)
        logged = access.isEnabledFor(logging.INFO)
        started = time.perf_counter() if logged else 0.0
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if logged:
                _log_access(scope, status, time.perf_counter() - started)
            CURRENT.reset(token)


def _log_access(scope: Scope, status: int, seconds: float) -> None:
    """One line: method, path (never the query string: it may carry what should not be
    logged), status, duration; the request id and run_id come from the context."""
    method, path, duration_ms = scope["method"], scope["path"], round(seconds * 1000, 3)
    access.info(
        "%s %s %d %.1f ms",
        method,
        path,
        status,
        duration_ms,
        extra={"method": method, "path": path, "status": status, "duration_ms": duration_ms},
    )
