"""Reading request bodies with a size cap, before any parsing."""

from __future__ import annotations

from starlette.requests import Request

from proxy.errors import BrokerError

MAX_BODY_BYTES = 1024 * 1024


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
