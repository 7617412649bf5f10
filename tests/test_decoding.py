"""proxy.decoding: Content-Encoding undone in bounded pieces, whatever the ratio."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import AsyncIterator

import pytest

from proxy.decoding import STEP, decoded
from proxy.errors import ParseError

BODY = b"".join(b"%d," % i for i in range(100_000))


async def _chunks(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def _decode(data: bytes, encoding: str | None) -> list[bytes]:
    return [piece async for piece in decoded(_chunks(data), encoding)]


def _raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize(
    ("data", "encoding"),
    [
        (BODY, None),
        (BODY, "identity"),
        (gzip.compress(BODY), "gzip"),
        (gzip.compress(BODY), "X-GZIP"),
        (zlib.compress(BODY), "deflate"),
        (_raw_deflate(BODY), "deflate"),
        (gzip.compress(zlib.compress(BODY)), "deflate, gzip"),
        (BODY, "br"),  # never asked for; passed through as httpx does
    ],
)
async def test_round_trip(data: bytes, encoding: str | None) -> None:
    assert b"".join(await _decode(data, encoding)) == BODY


async def test_a_bomb_comes_out_in_bounded_pieces() -> None:
    bomb = gzip.compress(bytes(8 * 1024 * 1024))
    sizes = {len(piece) for piece in await _decode(bomb, "gzip")}
    assert max(sizes) <= STEP
    assert sum(len(p) for p in await _decode(bomb, "gzip")) == 8 * 1024 * 1024


async def test_corrupt_bodies_are_parse_errors() -> None:
    with pytest.raises(ParseError, match="not valid gzip"):
        await _decode(b"\x1f\x8b" + b"not gzip at all", "gzip")
    with pytest.raises(ParseError, match="not valid deflate"):
        await _decode(b"\xff" * 50, "deflate")
