"""An upstream body's Content-Encoding, undone a bounded step at a time.

httpx inflates each network read whole: one 64 KiB read of gzipped zeros becomes
64 MiB in a single call, before any size cap can look at it. Here every step
inflates at most ``STEP`` bytes, so the cap in proxy.upstream sees each piece
and a compression bomb is abandoned within one step of the cap.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator

from proxy.errors import ParseError

STEP = 64 * 1024
ACCEPT_ENCODING = "gzip, deflate"
"""What the client asks for: exactly the codings decoded here."""
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


async def decoded(raw: AsyncIterable[bytes], content_encoding: str | None) -> AsyncIterator[bytes]:
    """The body of ``raw`` network chunks in pieces of at most STEP bytes.

    Codings are undone in reverse order of the header; unknown ones pass through as
    httpx passes them (we never ask for them). A corrupt body is a ParseError.
    """
    codings = [c.strip().lower() for c in (content_encoding or "").split(",")]
    layers = [_Inflater(c) for c in reversed(codings) if c in _WBITS]
    async for chunk in raw:
        pieces: Iterable[bytes] = (chunk,)
        for layer in layers:
            pieces = layer.feed(pieces)  # generators: one piece at a time flows inward
        for piece in pieces:
            yield piece


class _Inflater:
    """One zlib stream; ``deflate`` falls back to raw deflate on its first bytes, as httpx
    does, since servers send either."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self.zlib = zlib.decompressobj(_WBITS[coding])
        self.started = False

    def feed(self, pieces: Iterable[bytes]) -> Iterator[bytes]:
        for data in pieces:
            while True:
                out = self._inflate(data)
                if out:
                    yield out
                data = self.zlib.unconsumed_tail
                # A full step may leave output pending in zlib with no input left: ask again.
                if not data and len(out) < STEP:
                    break

    def _inflate(self, data: bytes) -> bytes:
        retry, self.started = self.coding == "deflate" and not self.started, True
        try:
            return self.zlib.decompress(data, STEP)
        except zlib.error as exc:
            if not retry:
                raise ParseError(f"upstream body is not valid {self.coding}") from exc
        self.zlib = zlib.decompressobj(-zlib.MAX_WBITS)
        return self._inflate(data)
