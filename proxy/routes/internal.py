"""``POST /internal/data-broker``: the orchestrator's only route, as a bare ASGI app.

It is the hot path. Starlette's request/response wrapper (a Request, a Response
object, the per-route exception handling) cost about 8% of a cache hit's CPU
(``databroker bench --profile``), so this route reads the body and sends the
answer itself. The contract is unchanged: declared JSON only, bodies over
MAX_BODY_BYTES refused before they are buffered, both as INVALID_REQUEST.
"""

from __future__ import annotations

from starlette.requests import ClientDisconnect
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy import messages
from proxy.errors import InvalidRequest
from proxy.routes.bodies import MAX_BODY_BYTES, is_json

PATH = "/internal/data-broker"
_TOO_LARGE = f"body exceeds {MAX_BODY_BYTES} bytes"


class DataBroker:
    """The route's ASGI app.

    A class, not a function: Starlette mounts an instance as it is, where a
    function endpoint would get the request/response wrapper.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = await _read_json(scope, receive)
        except InvalidRequest as exc:
            status, payload = exc.status, messages.failure(exc)
        except ClientDisconnect:
            return  # nobody is left to answer, and nothing was resolved or journaled
        else:
            answer = await scope["state"]["broker"].handle(body)
            status, payload = answer.status, answer.body
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


async def _read_json(scope: Scope, receive: Receive) -> bytes:
    """The body, if declared JSON and within the cap (as proxy.routes.bodies.read_json)."""
    content_type = declared = None
    for name, value in scope["headers"]:
        # The first of a repeated header wins, as in Starlette's Headers.get.
        if name == b"content-type" and content_type is None:
            content_type = value.decode("latin-1")
        elif name == b"content-length" and declared is None:
            declared = value
    if not is_json(content_type):
        raise InvalidRequest("Content-Type must be application/json")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise InvalidRequest(_TOO_LARGE)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise InvalidRequest(_TOO_LARGE)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class FrontDoor:
    """Sends ``POST /internal/data-broker`` straight to its handler, past Starlette's
    middleware and routing (~15 µs of a hit); everything else goes to ``app``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.hot = DataBroker()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == PATH and scope["method"] == "POST":
            await self.hot(scope, receive, send)
        else:
            await self.app(scope, receive, send)


# Behind the front door this route only answers other methods (405); kept so the
# router knows the path.
routes = [Route(PATH, DataBroker(), methods=["POST"])]
