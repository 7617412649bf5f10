"""Calls the upstream API through the one shared httpx client, with retries.

Each attempt is bounded twice: httpx's per-operation timeouts, and an overall
``asyncio.timeout`` so an upstream that drips one byte at a time cannot hold a
request forever. The body is read in chunks and abandoned as soon as it passes
the size cap, so a huge answer is never held in memory. Every connection is
opened through the egress backend (``proxy.egress``), redirect hops included.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from urllib.parse import urlencode

import httpcore
import httpx

from proxy.egress import EgressBackend, EgressPolicy
from proxy.errors import (
    InternalError,
    ResponseTooLarge,
    UpstreamConnectError,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamTimeout,
)
from proxy.retry import Retrying
from proxy.templates import RenderedRequest

# httpx logs every request at INFO with its full URL, and httpcore every response's headers
# at DEBUG: URLs carry variables (API keys in a query or path), so every line would hold a
# secret. Warnings still pass.
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)


@dataclass(frozen=True, slots=True)
class Fetched:
    status: int
    content: bytes
    content_type: str | None
    attempts: int


MAX_REDIRECTS = 5


class _EgressTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport (request, response and error mapping) over a pool whose
    every new connection goes through ``backend``."""

    def __init__(self, backend: httpcore.AsyncNetworkBackend, limits: httpx.Limits) -> None:
        ssl_context = httpx.create_ssl_context(trust_env=False)
        super().__init__(verify=ssl_context, limits=limits, trust_env=False)
        # httpx 0.28 has no argument for a network backend (encode/httpx#3749 proposes one):
        # replace the pool it just built (no I/O yet) by the same pool over our backend.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=backend,
        )


def create_client(egress: EgressPolicy | None = None) -> httpx.AsyncClient:
    """The one shared client; without a policy, the built-in denies apply."""
    transport = _EgressTransport(
        EgressBackend(egress or EgressPolicy.parse()),
        httpx.Limits(max_connections=512, max_keepalive_connections=128),
    )
    # Redirects are not followed here: a 3xx is an answer, unless the source asks (fetch).
    return httpx.AsyncClient(
        transport=transport,
        follow_redirects=False,
        timeout=httpx.Timeout(10.0),
        trust_env=False,
    )


class Upstream:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def fetch(
        self,
        request: RenderedRequest,
        *,
        timeout: float,
        retrying: Retrying,
        max_bytes: int,
        follow_redirects: bool = False,
    ) -> Fetched:
        """Raises an UpstreamError; EgressDenied and ResponseTooLarge pass through, unretried."""
        attempt = 0
        while True:
            try:
                async with asyncio.timeout(timeout):
                    status, content, content_type = await self._attempt(
                        request, timeout, max_bytes, follow_redirects
                    )
            except (TimeoutError, httpx.TimeoutException) as exc:
                error: UpstreamError = UpstreamTimeout(
                    f"upstream did not answer within {timeout:g}s"
                )
                retry = retrying.retries_transport_error(attempt)
                cause: BaseException = exc
            except httpx.TransportError as exc:
                error = UpstreamConnectError(f"upstream connection failed: {type(exc).__name__}")
                retry = retrying.retries_transport_error(attempt)
                cause = exc
            except httpx.InvalidURL as exc:
                # Not str(exc): it quotes the bad part of the URL, which may be a variable.
                raise InternalError(
                    "the rendered URL is not valid: check the source's url and variables"
                ) from exc
            else:
                if 200 <= status < 300:
                    return Fetched(status, content, content_type, attempt + 1)
                error = UpstreamHTTPError(status)
                retry = retrying.retries_status(status, attempt)
                cause = error
            if not retry:
                raise error from cause
            await asyncio.sleep(retrying.backoff(attempt))
            attempt += 1

    async def _attempt(
        self, request: RenderedRequest, timeout: float, max_bytes: int, follow_redirects: bool
    ) -> tuple[int, bytes, str | None]:
        url = httpx.URL(request.url)
        if request.params:
            # Appended, as the seed's requests does: httpx 0.28 drops the URL's own query
            # when ``params=`` is given, and copy_merge_params reorders it and replaces
            # same-named keys. The URL's query stays byte for byte, params follow in order.
            extra = urlencode(request.params).encode("ascii")
            url = url.copy_with(query=url.query + b"&" + extra if url.query else extra)
        built = self.client.build_request(
            request.method,
            url,
            headers=list(request.headers),
            content=request.content,
            timeout=timeout,
        )
        response = await self.client.send(built, stream=True)
        # Hops are followed here, not by httpx's follow_redirects=True: httpx reads each 3xx
        # body whole into memory (the size cap would not apply) and ends a loop with
        # TooManyRedirects instead of an answer. Each hop is a new request through the same
        # transport, so the egress backend checks its destination; all hops share the
        # attempt's timeout. Past MAX_REDIRECTS the last 3xx is the answer (HTTP_ERROR).
        hops = 0
        while follow_redirects and response.next_request is not None and hops < MAX_REDIRECTS:
            hop = response.next_request
            await response.aclose()
            response = await self.client.send(hop, stream=True)
            hops += 1
        try:
            if not 200 <= response.status_code < 300:
                return response.status_code, b"", None
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise ResponseTooLarge(max_bytes)
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise ResponseTooLarge(max_bytes)
                chunks.append(chunk)
            return response.status_code, b"".join(chunks), response.headers.get("content-type")
        finally:
            await response.aclose()
