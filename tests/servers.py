"""Real servers for tests: uvicorn in a background thread on a free port."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

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


@dataclass
class TokenIssuer:
    """A real OAuth2 token endpoint (RFC 6749 ``client_credentials`` and ``password``
    grants, client credentials in the form) and the API its tokens open, both served by
    an ``Upstream``: tokens expire by this process's clock, can be revoked, are counted."""

    client_id: str = "issuer-client"
    client_secret: str = "issuer-secret"
    username: str = "issuer-user"
    password: str = "issuer-password"
    expires_in: float = 3600
    failing: int | None = None
    """A status to answer every token request with, instead of a token."""
    garbage: bytes | None = None
    """A 200 body to answer every token request with, instead of a token."""
    delay: float = 0.0
    """Seconds each token request takes: a slow endpoint, for callers to contend on."""
    token_prefix: str = "tok"
    issued: dict[str, float] = field(default_factory=dict)
    """Each token issued, and when (monotonic) it expires."""
    forms: list[dict[str, str]] = field(default_factory=list)
    api_calls: list[str | None] = field(default_factory=list)
    """The Authorization header of each API call."""

    def install(self, upstream: Upstream) -> tuple[str, str]:
        """Serve the endpoint and the API on ``upstream``; their URLs."""
        return upstream.on("/oauth/token", self._token), upstream.on("/api", self._api)

    def revoke_all(self) -> None:
        self.issued.clear()

    async def _token(self, request: Request) -> Response:
        form = dict(parse_qsl((await request.body()).decode()))
        self.forms.append(form)
        await asyncio.sleep(self.delay)
        if self.failing is not None:
            return Response(b'{"error": "temporarily_unavailable"}', self.failing)
        if self.garbage is not None:
            return Response(self.garbage, media_type="text/html")
        client_ok = (form.get("client_id"), form.get("client_secret")) == (
            self.client_id,
            self.client_secret,
        )
        user_ok = (form.get("username"), form.get("password")) == (self.username, self.password)
        grant = form.get("grant_type")
        if not client_ok or (grant == "password" and not user_ok):
            return Response(b'{"error": "invalid_client"}', 401, media_type="application/json")
        if grant not in ("client_credentials", "password"):
            return Response(b'{"error": "unsupported_grant_type"}', 400)
        token = f"{self.token_prefix}-{uuid.uuid4().hex}"
        self.issued[token] = time.monotonic() + self.expires_in
        answer = {"access_token": token, "token_type": "Bearer", "expires_in": self.expires_in}
        return Response(json.dumps(answer).encode(), media_type="application/json")

    async def _api(self, request: Request) -> Response:
        header = request.headers.get("authorization")
        self.api_calls.append(header)
        token = (header or "").removeprefix("Bearer ")
        if self.issued.get(token, 0) <= time.monotonic():
            return Response(b'{"error": "invalid_token"}', 401, media_type="application/json")
        return Response(b'{"ok": true}', media_type="application/json")
