"""``python -m bench.request_ids``: what ``proxy.request_ids`` adds to every request.

A micro benchmark, in process: the middleware around an ASGI app that answers at
once, against that app alone, with and without an ``X-Request-ID`` to take, and
with the access log on (to a handler that drops the line after formatting it).
Prints microseconds per request, the median of ``--rounds``.
"""

from __future__ import annotations

import asyncio
import io
import logging
import statistics
import time

import click
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.logs import ACCESS_LOGGER, JsonFormatter, RequestFilter
from proxy.request_ids import RequestIds


async def _answer(_scope: Scope, _receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _discard(_message: Message) -> None:
    return None


def _scope(headers: list[tuple[bytes, bytes]]) -> Scope:
    return {"type": "http", "method": "POST", "path": "/internal/data-broker", "headers": headers}


async def _per_request_us(app: ASGIApp, scope: Scope, requests: int) -> float:
    started = time.perf_counter()
    for _ in range(requests):
        await app(dict(scope), _receive, _discard)
    return (time.perf_counter() - started) / requests * 1e6


def _access_log(on: bool) -> None:
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if on else logging.CRITICAL)
    if on:
        handler = logging.StreamHandler(io.StringIO())
        handler.setFormatter(JsonFormatter())
        handler.addFilter(RequestFilter())
        logger.addHandler(handler)


@click.command()
@click.option("--requests", default=200_000, show_default=True, type=click.IntRange(min=1))
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(min=1))
def main(requests: int, rounds: int) -> None:
    """Microseconds per request, the middleware against none."""
    plain = [(b"content-type", b"application/json"), (b"content-length", b"80")]
    given = [*plain, (b"x-request-id", b"0f6e2b1c-9a7d-4e3f-8c5b-1a2d3e4f5a6b")]
    cases: list[tuple[str, ASGIApp, Scope, bool]] = [
        ("no middleware", _answer, _scope(plain), False),
        ("id made", RequestIds(_answer), _scope(plain), False),
        ("id taken", RequestIds(_answer), _scope(given), False),
        ("id made, access log on", RequestIds(_answer), _scope(plain), True),
    ]
    for name, app, scope, access in cases:
        _access_log(access)
        times = [asyncio.run(_per_request_us(app, scope, requests)) for _ in range(rounds)]
        click.echo(f"{name:<24} {statistics.median(times):6.2f} µs/request")
    _access_log(False)


if __name__ == "__main__":
    main()
