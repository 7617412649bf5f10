"""Calls the upstream API through the one shared httpx client, with retries.

Each attempt is bounded twice: httpx's per-operation timeouts, and an overall
``asyncio.timeout`` so an upstream that drips one byte at a time cannot hold a
request forever. The body is read in chunks and abandoned as soon as it passes
the size cap, so a huge answer is never held in memory. Every connection is
opened through the egress dialer (``proxy.egress``), redirect hops included, by
our own transport (``proxy.transport``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlencode

import httpx

from proxy.decoding import ACCEPT_ENCODING, decoded
from proxy.egress import EgressDialer, EgressPolicy
from proxy.errors import (
    InternalError,
    ResponseTooLarge,
    UpstreamConnectError,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamTimeout,
)
from proxy.metrics import upstream_counts
from proxy.retry import Retrying, parse_retry_after
from proxy.templates import RenderedRequest
from proxy.transport import PooledTransport
from proxy.vendor_guard import hold_of

# httpx logs every request at INFO with its full URL: URLs carry variables (API keys in a
# query or path), so every line would hold a secret. Warnings still pass. (httpcore, which
# logs every response's headers at DEBUG, is no longer under the client: held all the same.)
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)


@dataclass(frozen=True, slots=True)
class Fetched:
    content: bytes
    content_type: str | None
    attempts: int
    status: int = 200
    headers: httpx.Headers | None = field(default=None, compare=False)
    """The answer's headers, for ``POST …/test`` to show (the broker reads none)."""


def full_url(request: RenderedRequest) -> httpx.URL:
    """The URL sent: the rendered one, its query byte for byte, then ``params`` in order.

    Appended, as the seed's requests does: httpx 0.28 drops the URL's own query when
    ``params=`` is given, and copy_merge_params reorders it and replaces same-named keys.
    """
    url = httpx.URL(request.url)
    if not request.params:
        return url
    extra = urlencode(request.params).encode("ascii")
    return url.copy_with(query=url.query + b"&" + extra if url.query else extra)


MAX_REDIRECTS = 5


# Up to 512 connections, 128 of them kept idle between bursts, each idle for 4 s at most:
# under the shortest common server keep-alive (uvicorn's 5 s; nginx's is 75 s), so a reused
# connection is not one its server is closing at that very moment.
LIMITS = httpx.Limits(max_connections=512, max_keepalive_connections=128, keepalive_expiry=4.0)


class _NoCookies(httpx.Cookies):
    """A cookie jar that never takes one from a response."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


_NO_COOKIES = _NoCookies()


class _SharedClient(httpx.AsyncClient):
    """httpx's client whose cookie jar stays empty.

    The client is shared by every source and tenant: a cookie one upstream sets must
    never ride along on another source's request. Not extracting them at all also
    spares each response httpx's cookie parsing (two urllib adapters and a jar pass,
    ~130 µs of a miss's CPU on a busy machine).
    """

    @property
    def cookies(self) -> httpx.Cookies:
        return _NO_COOKIES

    @cookies.setter
    def cookies(self, cookies: object) -> None:
        raise TypeError("the shared upstream client keeps no cookies")


def create_client(
    egress: EgressPolicy | None = None, ssl_context: ssl.SSLContext | None = None
) -> httpx.AsyncClient:
    """The one shared client; without a policy, the built-in denies apply.

    The transport is ours (``proxy.transport``): httpx's default one, over httpcore's
    pool, spends CPU per request that grows with the number of connections.
    """
    transport = PooledTransport(
        EgressDialer(egress or EgressPolicy.parse()), limits=LIMITS, ssl_context=ssl_context
    )
    # Redirects are not followed here: a 3xx is an answer, unless the source asks (fetch).
    return _SharedClient(
        transport=transport,
        follow_redirects=False,
        timeout=httpx.Timeout(10.0),
        trust_env=False,
        headers={"Accept-Encoding": ACCEPT_ENCODING},
    )


def _maybe_sent(exc: Exception) -> bool:
    """Whether the upstream may have received the request: only a connection that was
    never made (refused, unresolvable, connect or pool timeout) proves it did not."""
    return not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


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
        source: str = "",
        throttled: Callable[[float], Awaitable[None]] | None = None,
    ) -> Fetched:
        """Raises an UpstreamError; EgressDenied and ResponseTooLarge pass through, unretried.

        All attempts and waits fit in ``retrying.deadline(timeout)``: an attempt gets
        at most what is left of it, and a ``Retry-After`` that does not fit ends the
        retries with the answer that asked for it. Each attempt is counted under the
        data source's name ``source``. An upstream 429 that says how long to stay away
        is told to ``throttled`` at once, before any retry waits for it.
        """
        counts = upstream_counts(source)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + retrying.deadline(timeout)
        attempt = 0
        while True:
            budget = min(timeout, give_up - loop.time())
            retry_after = None
            try:
                async with asyncio.timeout(budget):
                    status, content, headers = await self._attempt(
                        request, budget, max_bytes, follow_redirects
                    )
            except (TimeoutError, httpx.TimeoutException) as exc:
                error: UpstreamError = UpstreamTimeout(
                    f"upstream did not answer within {timeout:g}s"
                )
                retry = retrying.retries_transport_error(attempt, sent=_maybe_sent(exc))
                cause: BaseException = exc
            except httpx.TransportError as exc:
                error = UpstreamConnectError(f"upstream connection failed: {type(exc).__name__}")
                retry = retrying.retries_transport_error(attempt, sent=_maybe_sent(exc))
                cause = exc
            except httpx.InvalidURL as exc:
                # Not str(exc): it quotes the bad part of the URL, which may be a variable.
                raise InternalError(
                    "the rendered URL is not valid: check the source's url and variables"
                ) from exc
            else:
                counts.response(str(status))
                if 200 <= status < 300:
                    return Fetched(
                        content, headers.get("content-type"), attempt + 1, status, headers
                    )
                # An upstream 429 says how long to stay away: the broker holds the source.
                hold = hold_of(headers, time.time()) if status == 429 else None
                if hold is not None and throttled is not None:
                    await throttled(hold)
                error = UpstreamHTTPError(status, hold)
                retry = retrying.retries_status(status, attempt)
                retry_after = parse_retry_after(headers.get("retry-after"), time.time())
                cause = error
            if cause is not error:
                counts.response(error.code)  # no status came back
            delay = retrying.wait(attempt, retry_after, give_up - loop.time()) if retry else None
            if delay is None:
                raise error from cause
            counts.retries.inc()
            await asyncio.sleep(delay)
            attempt += 1

    async def _attempt(
        self, request: RenderedRequest, timeout: float, max_bytes: int, follow_redirects: bool
    ) -> tuple[int, bytes, httpx.Headers]:
        built = self.client.build_request(
            request.method,
            full_url(request),
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
                return response.status_code, b"", response.headers
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise ResponseTooLarge(max_bytes)
            chunks: list[bytes] = []
            size = 0
            # Not aiter_bytes: httpx inflates each read whole, a bomb before the cap sees it.
            encoding = response.headers.get("content-encoding")
            async for chunk in decoded(response.aiter_raw(), encoding):
                size += len(chunk)
                if size > max_bytes:
                    raise ResponseTooLarge(max_bytes)
                chunks.append(chunk)
            return response.status_code, b"".join(chunks), response.headers
        finally:
            await response.aclose()
