"""Reading JSON request bodies: the declared type first, then a size cap, before any parsing."""

from __future__ import annotations

from starlette.requests import Request

from proxy.errors import BrokerError

MAX_BODY_BYTES = 1024 * 1024


def is_json(content_type: str | None) -> bool:
    """``application/json`` or ``application/…+json``, parameters (charset) aside."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def read_json(request: Request, error: type[BrokerError]) -> bytes:
    """The body of a route that takes JSON; ``error`` unless it is declared JSON.

    Declared JSON is required, not guessed: a browser page may post text/plain, a
    form or a typeless body to 127.0.0.1 without a CORS preflight, and must not be
    able to make the sidecar spend a paid call.
    """
    if not is_json(request.headers.get("content-type")):
        raise error("Content-Type must be application/json")
    return await read_capped(request, error)


async def read_capped(request: Request, error: type[BrokerError]) -> bytes:
    """The whole body, or ``error`` once it passes MAX_BODY_BYTES (never buffered past that)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise error(f"body exceeds {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise error(f"body exceeds {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
