"""Hostile upstream bodies through the running broker: each ends in its documented code,
with an audit row and no cache entry, and without the broker holding the bomb in memory.

Memory is measured with tracemalloc around one request: the broker, the upstream and
the client share this process, so the traced peak bounds what the broker held.
"""

from __future__ import annotations

import asyncio
import tracemalloc
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import cache
from typing import Any

import pytest
import redis as sync_redis
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from tests.conftest import REDIS_URL, Broker
from tests.harness import async_wait_for
from tests.servers import Upstream
from tests.test_flow import rows

MiB = 1024 * 1024
CAP = MiB  # the source's max_response_bytes where a case needs a lower cap than the default

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<lolz>&lol9;</lolz>"""
EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE r [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<r>&secret;</r>"""
QUADRATIC_ENTITY = (
    b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "'
    + b"x" * 50_000
    + b'">]><r>'
    + b"&a;" * 50_000
    + b"</r>"
)


def external_dtd(url: str) -> bytes:
    return f'<?xml version="1.0"?><!DOCTYPE r SYSTEM "{url}"><r>x</r>'.encode()


def repeated_attribute(size: int, count: int) -> bytes:
    """Quadratic blowup without entities: one huge attribute value, written out each time."""
    element = b'<a v="' + b"x" * size + b'"/>'
    return b"<r>" + element * count + b"</r>"


@cache
def gzip_bomb(size: int = 50 * MiB) -> bytes:
    """``size`` zero bytes gzipped (about 50 KB), built without ever holding ``size`` bytes."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(MiB)
    return b"".join(packer.compress(block) for _ in range(size // MiB)) + packer.flush()


# "Endless" streams end after far more than the broker reads: uvicorn drops what is sent
# to a closed connection without raising, so a truly endless generator would spin in the
# shared upstream server long after the broker hung up.


async def _endless(_: Request) -> Response:
    async def forever() -> AsyncIterator[bytes]:
        block = b"a" * 65536
        for _ in range(16_384):  # 1 GiB
            yield block

    return StreamingResponse(forever(), media_type="text/plain")


async def _drip(_: Request) -> Response:
    async def slowly() -> AsyncIterator[bytes]:
        for _ in range(400):  # 20 s, against a 0.5 s timeout
            yield b" "
            await asyncio.sleep(0.05)  # the upstream's behaviour under test, not a wait

    return StreamingResponse(slowly(), media_type="application/json")


def _bomb(_: Request) -> Awaitable[Response]:
    async def answer() -> Response:
        return Response(
            gzip_bomb(), media_type="application/json", headers={"Content-Encoding": "gzip"}
        )

    return answer()


Body = bytes | Callable[[Request], Awaitable[Response]]


async def fetch(
    broker: Broker,
    upstream: Upstream,
    body: Body,
    response_type: str,
    content_type: str = "application/octet-stream",
    **source: Any,
) -> tuple[dict[str, Any], int, uuid.UUID]:
    """Register a cached source answering ``body``, call it once: (answer, status, run_id)."""
    name = f"hostile_{uuid.uuid4().hex[:8]}"
    path = f"/{name}"
    if isinstance(body, bytes):
        url = upstream.answer(path, body, content_type=content_type)
    else:
        url = upstream.on(path, body)
    await broker.register(
        {
            "name": name,
            "source": {"url": url, "response_type": response_type, **source},
            "caching": {"enabled": True, "ttl": 60},
        }
    )
    run_id = uuid.uuid4()
    answer = await broker.call(name, run_id=run_id)
    return answer.json(), answer.status_code, run_id


async def assert_recorded(
    db: AsyncEngine, redis_prefix: str, run_id: uuid.UUID, code: str, stored: bool
) -> None:
    """One audit row with the error; a DataObject only when a body was read whole; no cache."""
    audit = await async_wait_for(
        lambda: rows(
            db,
            "SELECT error, data_object_id FROM run_data_request WHERE run_id = :r",
            r=run_id,
        )
    )
    assert len(audit) == 1
    assert audit[0]["error"]["code"] == code
    assert (audit[0]["data_object_id"] is not None) == stored
    assert sync_redis.Redis.from_url(REDIS_URL).keys(f"{redis_prefix}cache:*") == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (BILLION_LAUGHS, "DTDForbidden"),
        (EXTERNAL_ENTITY, "DTDForbidden"),
        (QUADRATIC_ENTITY, "DTDForbidden"),
        (b"<r>" * 100_000 + b"x" + b"</r>" * 100_000, "nested deeper than 100"),
    ],
    ids=["billion-laughs", "external-entity", "quadratic-entity", "nested-100k"],
)
async def test_xml_bombs_are_parse_errors(
    broker: Broker,
    upstream: Upstream,
    db: AsyncEngine,
    redis_prefix: str,
    body: bytes,
    reason: str,
) -> None:
    answer, status, run_id = await fetch(broker, upstream, body, "XML", "application/xml")
    assert status == 500
    assert answer["error"]["code"] == "PARSE_ERROR"
    assert reason in answer["error"]["message"]
    assert "passwd" not in answer["error"]["message"] and "lol" not in answer["error"]["message"]
    await assert_recorded(db, redis_prefix, run_id, "PARSE_ERROR", stored=True)


async def test_an_external_dtd_is_never_fetched(
    broker: Broker, upstream: Upstream, db: AsyncEngine, redis_prefix: str
) -> None:
    dtd = upstream.answer("/evil.dtd", b'<!ENTITY x "pwned">', content_type="application/xml-dtd")
    answer, status, run_id = await fetch(broker, upstream, external_dtd(dtd), "XML")
    assert (status, answer["error"]["code"]) == (500, "PARSE_ERROR")
    assert upstream.hits("/evil.dtd") == 0
    await assert_recorded(db, redis_prefix, run_id, "PARSE_ERROR", stored=True)


async def test_a_repeated_huge_attribute_ends_bounded(broker: Broker, upstream: Upstream) -> None:
    """No entity to refuse: under the cap it is just a large answer, over it a refusal."""
    body = repeated_attribute(100_000, 8)
    answer, status, _ = await fetch(broker, upstream, body, "XML", max_response_bytes=CAP)
    assert status == 200, answer
    assert answer["value"] == {"a": [{"v": "x" * 100_000}] * 8}

    body = repeated_attribute(100_000, 20)
    answer, status, _ = await fetch(broker, upstream, body, "XML", max_response_bytes=CAP)
    assert (status, answer["error"]["code"]) == (502, "RESPONSE_TOO_LARGE")


@pytest.mark.parametrize(
    ("body", "response_type", "content_type", "reason"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "JSON", "application/json", "depth"),
        (b"[" * 300 + b"]" * 300, "JSON", "application/json", "JSON body does not parse"),
        (b"a,b\n" + b'"' + b"x" * MiB + b'",1\n', "CSV", "text/csv", "field larger"),
        (b'{"a": 1}', "JSON", "application/json; charset=utf-16", "JSON body does not parse"),
        (b'{"a":1}', "JSON", "application/json; charset=utf-16", "not valid utf-16"),
        (b'{"a":1}', "JSON", "application/json; charset=no-such", "unknown charset"),
        (b'{"a": "\xff"}', "JSON", "application/json", "not valid utf-8"),
    ],
    ids=[
        "json-nested-100k",
        "json-nested-300",
        "csv-1mb-field",
        "utf16-declared-even",
        "utf16-declared-odd",
        "unknown-charset",
        "not-utf8",
    ],
)
async def test_bodies_that_do_not_parse(
    broker: Broker,
    upstream: Upstream,
    db: AsyncEngine,
    redis_prefix: str,
    body: bytes,
    response_type: str,
    content_type: str,
    reason: str,
) -> None:
    answer, status, run_id = await fetch(broker, upstream, body, response_type, content_type)
    assert status == 500, answer
    assert answer["error"]["code"] == "PARSE_ERROR"
    assert reason in answer["error"]["message"]
    await assert_recorded(db, redis_prefix, run_id, "PARSE_ERROR", stored=True)


async def test_a_corrupt_gzip_body_is_a_parse_error(
    broker: Broker, upstream: Upstream, db: AsyncEngine, redis_prefix: str
) -> None:
    async def corrupt(_: Request) -> Response:
        return Response(b"\x1f\x8b not gzip", headers={"Content-Encoding": "gzip"})

    answer, status, run_id = await fetch(broker, upstream, corrupt, "JSON")
    assert (status, answer["error"]["code"]) == (500, "PARSE_ERROR")
    assert answer["error"]["message"] == "upstream body is not valid gzip"
    await assert_recorded(db, redis_prefix, run_id, "PARSE_ERROR", stored=False)


@pytest.mark.parametrize("handler", [_bomb, _endless], ids=["gzip-bomb-50mb", "endless-stream"])
async def test_unbounded_bodies_stop_at_the_cap_in_bounded_memory(
    broker: Broker,
    upstream: Upstream,
    db: AsyncEngine,
    redis_prefix: str,
    handler: Callable[[Request], Awaitable[Response]],
) -> None:
    gzip_bomb()  # built before measuring: the test's own bytes are not the broker's
    tracemalloc.start()
    try:
        answer, status, run_id = await fetch(
            broker, upstream, handler, "JSON", max_response_bytes=CAP, timeout=30
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 502, answer
    assert answer["error"] == {
        "code": "RESPONSE_TOO_LARGE",
        "message": f"upstream body exceeds {CAP} bytes",
        "limit": CAP,
    }
    # The cap is 1 MiB and this stays near 2; inflating each read whole, as httpx does,
    # peaked at 128. The margin is for whatever else this process's threads allocate.
    assert peak < 32 * MiB, f"peak traced memory {peak / MiB:.1f} MiB"
    await assert_recorded(db, redis_prefix, run_id, "RESPONSE_TOO_LARGE", stored=False)


async def test_a_dripping_upstream_ends_in_timeout(
    broker: Broker, upstream: Upstream, db: AsyncEngine, redis_prefix: str
) -> None:
    answer, status, run_id = await fetch(broker, upstream, _drip, "JSON", timeout=0.5)
    assert (status, answer["error"]["code"]) == (502, "TIMEOUT")
    await assert_recorded(db, redis_prefix, run_id, "TIMEOUT", stored=False)
