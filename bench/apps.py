"""The benchmark's reference apps, each served by ``bench.run`` as its own uvicorn process.

- ``upstream``: answers a fixed JSON body on any path — the local API every miss calls.
- ``ceiling``: reads one Redis key and returns it with orjson — the least any cached
  answer can cost on this stack.
- ``direct``: calls the upstream with one shared httpx client and returns its body — the
  least any miss can cost.

``ceiling`` and ``direct`` read the posted body as the broker must, but do not parse it.
Like the broker, they freeze what start-up allocated (``gc.freeze``), so that their
tails are not full collections the broker no longer pays. They are configured by
``DATABROKER_BENCH_*`` environment variables, set by the bench.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.redis_pool import CONNECT_TIMEOUT, SOCKET_TIMEOUT
from tests.harness import BROKER_PATH

UPSTREAM_BODY = orjson.dumps(
    {
        "id": "42",
        "name": "Ada Lovelace",
        "score": 710,
        "flags": {"pep": False, "sanctioned": False},
        "addresses": [{"city": "London", "since": "1835-07-08"}],
    }
)
"""The upstream's answer: small, like most credit and identity lookups."""


def upstream() -> Starlette:
    async def answer(_: Request) -> Response:
        return Response(UPSTREAM_BODY, media_type="application/json")

    return Starlette(routes=[Route("/{path:path}", answer, methods=["GET", "POST"])])


def ceiling() -> Starlette:
    url = os.environ["DATABROKER_BENCH_REDIS_URL"]
    key = os.environ["DATABROKER_BENCH_KEY"]

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[dict[str, Any]]:
        # The broker's own pool settings (proxy.redis_pool), so only the work differs.
        redis = Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=CONNECT_TIMEOUT,
            health_check_interval=30,
            max_connections=256,
        )
        gc.freeze()
        try:
            yield {"redis": redis}
        finally:
            await redis.aclose()

    async def read(request: Request) -> Response:
        await request.body()
        raw = await request.state.redis.get(key)
        return Response(
            orjson.dumps({"value": orjson.Fragment(raw)}), media_type="application/json"
        )

    return Starlette(routes=[Route(BROKER_PATH, read, methods=["POST"])], lifespan=lifespan)


def direct() -> Starlette:
    url = os.environ["DATABROKER_BENCH_UPSTREAM_URL"]

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[dict[str, Any]]:
        # A plain client with the broker's pool limits: the broker's egress checks and
        # streaming are part of what a miss costs over this.
        async with httpx.AsyncClient(
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=128),
            timeout=httpx.Timeout(10.0),
            trust_env=False,
        ) as client:
            gc.freeze()
            yield {"client": client}

    async def call(request: Request) -> Response:
        await request.body()
        answer = await request.state.client.get(url)
        return Response(answer.content, media_type="application/json")

    return Starlette(routes=[Route(BROKER_PATH, call, methods=["POST"])], lifespan=lifespan)
