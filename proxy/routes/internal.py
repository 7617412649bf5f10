"""``POST /internal/data-broker``: the orchestrator's only route, as a bare ASGI app.

It is the hot path. Starlette's request/response wrapper (a Request, a Response
object, the per-route exception handling) cost about 8% of a cache hit's CPU
(``python -m bench --profile``), so this route reads the body and sends the
answer itself. The contract is unchanged: declared JSON only, bodies over
MAX_BODY_BYTES refused before they are buffered, both as INVALID_REQUEST. Past
Starlette's error middleware, this route catches what raises itself: every
answer is the contract's envelope, a failure nobody foresaw INTERNAL.
"""

from __future__ import annotations

import logging
import math
import time

from starlette.requests import ClientDisconnect
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy import messages, tracing
from proxy.broker import Answer
from proxy.errors import InternalError, InvalidRequest
from proxy.metrics import record_request
from proxy.routes.bodies import read_json

logger = logging.getLogger("databroker.broker")

PATH = "/internal/data-broker"
"""The one place that names the route (the OpenAPI document and the benchmark import it)."""


class BrokerRoute:
    """The route's ASGI app.

    A class, not a function: Starlette mounts an instance as it is, where a
    function endpoint would get the request/response wrapper.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        with tracing.request(scope["headers"]) as traced:
            try:
                body = await read_json(scope, receive, InvalidRequest)
                answer = await scope["state"]["services"].broker.handle(body)
            except InvalidRequest as exc:
                answer = Answer(exc.status, messages.failure(exc), code=exc.code)
            except ClientDisconnect:
                return  # nobody is left to answer, and nothing was resolved or journaled
            except Exception:
                logger.exception("the broker route failed unexpectedly")
                error = InternalError("the broker failed unexpectedly; see its log")
                answer = Answer(error.status, messages.failure(error), code=error.code)
            if traced is not None:
                _annotate(traced, answer)
        # Counted before the answer leaves: a worker that scrapes right after its answer
        # finds it counted.
        record_request(answer.source, answer.origin, answer.code, time.perf_counter() - started)
        status, payload = answer.status, answer.body
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
        ]
        if answer.retry_after is not None:
            headers.append((b"retry-after", str(math.ceil(answer.retry_after)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _annotate(traced: tracing.Span, answer: Answer) -> None:
    tracing.annotate(
        traced,
        **{
            "databroker.source": answer.source or None,
            "databroker.origin": answer.origin,
            "http.response.status_code": answer.status,
        },
    )
    if answer.code != "OK":
        tracing.failed(traced, answer.code)


class FrontDoor:
    """Sends ``POST /internal/data-broker`` straight to its handler, past Starlette's
    middleware and routing (~15 µs of a hit); everything else goes to ``app``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.hot = BrokerRoute()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == PATH and scope["method"] == "POST":
            await self.hot(scope, receive, send)
        else:
            await self.app(scope, receive, send)


# Behind the front door this route only answers other methods (405); kept so the
# router knows the path.
routes = [Route(PATH, BrokerRoute(), methods=["POST"])]
