"""Real servers for tests: uvicorn in a background thread on a free port."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.harness import LOOPBACK, free_port, wait_for


@contextmanager
def serve_in_thread(app: Any, **config: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn on a free port; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host=LOOPBACK, port=port, log_level="warning", lifespan="on", **config)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), timeout=20)
    if not server.started:
        raise RuntimeError("server failed to start")
    try:
        yield f"http://{LOOPBACK}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class Upstream:
    """A programmable upstream: per-path handlers, and a log of every request received."""

    url: str = ""
    handlers: dict[str, Handler] = field(default_factory=dict)
    received: list[dict[str, Any]] = field(default_factory=list)

    def on(self, path: str, handler: Handler) -> str:
        self.handlers[path] = handler
        return f"{self.url}{path}"

    def answer(
        self,
        path: str,
        body: bytes | str,
        status: int = 200,
        content_type: str = "application/json",
    ) -> str:
        content = body.encode() if isinstance(body, str) else body

        async def handler(_: Request) -> Response:
            return Response(content, status, media_type=content_type)

        return self.on(path, handler)

    def hits(self, path: str) -> int:
        return sum(1 for r in self.received if r["path"] == path)


def upstream_app(state: Upstream) -> Starlette:
    async def dispatch(request: Request) -> Response:
        body = await request.body()
        state.received.append(
            {
                "method": request.method,
                "path": request.url.path,
                "raw_path": request.scope.get("raw_path", b""),
                "query": request.url.query,
                "headers": dict(request.headers),
                "body": body,
            }
        )
        handler = state.handlers.get(request.url.path)
        if handler is None:
            return Response(b"no handler", 404)
        return await handler(request)

    return Starlette(
        routes=[Route("/{path:path}", dispatch, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])]
    )
