"""Reading JSON request bodies: the declared type first, then a size cap, before any parsing.

One reader over raw ASGI ``scope``/``receive``, so the hot route (which has no
Starlette Request) and the admin routes (which pass their request's) share it.
"""

from __future__ import annotations

from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope

from proxy.errors import BrokerError

MAX_BODY_BYTES = 1024 * 1024


def is_json(content_type: str | None) -> bool:
    """``application/json`` or ``application/…+json``, parameters (charset) aside."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def read_json(
    scope: Scope,
    receive: Receive,
    error: type[BrokerError],
    too_large: type[BrokerError] | None = None,
) -> bytes:
    """The body of a route that takes JSON: ``error`` unless it is declared JSON, and
    ``too_large`` (default ``error``: each route keeps its contract's status) past
    MAX_BODY_BYTES, never buffered beyond that; ClientDisconnect if the client left.

    Declared JSON is required, not guessed: a browser page may post text/plain, a
    form or a typeless body to 127.0.0.1 without a CORS preflight, and must not be
    able to make the sidecar spend a paid call.
    """
    content_type = declared = None
    for name, value in scope["headers"]:
        # The first of a repeated header wins, as in Starlette's Headers.get.
        if name == b"content-type" and content_type is None:
            content_type = value.decode("latin-1")
        elif name == b"content-length" and declared is None:
            declared = value
    if not is_json(content_type):
        raise error("Content-Type must be application/json")
    refuse = too_large or error
    too_big = f"body exceeds {MAX_BODY_BYTES} bytes"
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise refuse(too_big)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise refuse(too_big)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
