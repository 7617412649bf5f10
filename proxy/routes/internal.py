"""``POST /internal/data-broker``: the orchestrator's only route."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy import messages
from proxy.errors import InvalidRequest
from proxy.routes.bodies import read_json


async def data_broker(request: Request) -> Response:
    try:
        body = await read_json(request, InvalidRequest)
    except InvalidRequest as exc:
        return Response(messages.failure(exc), exc.status, media_type="application/json")
    answer = await request.state.broker.handle(body)
    return Response(answer.body, answer.status, media_type="application/json")


routes = [Route("/internal/data-broker", data_broker, methods=["POST"])]
