"""Calls the upstream API through the one shared httpx client, with retries.

Each attempt is bounded twice: httpx's per-operation timeouts, and an overall
deadline (``proxy.transport.DEADLINE``, redirect hops included) so an upstream
that drips one byte at a time cannot hold a request forever. The body is read in
chunks and abandoned as soon as it passes the size cap, so a huge answer is
never held in memory. Every connection is opened through the egress dialer
(``proxy.egress``), redirect hops included, by our own transport
(``proxy.transport``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
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
from proxy.transport import DEADLINE, Body, PooledTransport
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
    text = request.url
    if request.params:
        extra = urlencode(request.params)
        base, _, query = text.partition("?")
        text = f"{base}?{query}&{extra}" if query else f"{base}?{extra}"
    return _URLS.parse(text)


# What httpx's URL parser leaves as it is in a path (and, with "?", in a query), in every
# httpx we support: RFC 3986's unreserved characters and sub-delimiters, ":", "@", "/",
# and well-formed %XX escapes. No fragment, no dot segment (httpx removes those).
_PLAIN_PATH = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]++|%[0-9A-Fa-f]{2})*+")
_PLAIN_QUERY = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]++|%[0-9A-Fa-f]{2})*+")
_DOT_SEGMENT = re.compile(r"/\.\.?(?:/|$)")


class _URLs:
    """``httpx.URL(text)``, with each origin (``scheme://host:port``) parsed once.

    httpx parses a URL in pure Python (~50 µs; its host check alone builds an
    ``ipaddress`` object). A source's origin never changes between its requests and
    its path and query are already percent-encoded by ``proxy.templates``: when they
    hold only characters httpx would leave as they are, the URL is the origin's parse
    with that path and query. Anything else is parsed by httpx in full.
    """

    LIMIT = 1024
    """Origins remembered (the cache starts over past this: sources, not requests)."""

    def __init__(self) -> None:
        self._origins: dict[str, httpx.URL] = {}

    def parse(self, text: str) -> httpx.URL:
        scheme_end = text.find("://")
        slash = text.find("/", scheme_end + 3) if scheme_end > 0 else -1
        if slash < 0 or "@" in text[:slash]:
            return httpx.URL(text)  # no path, or credentials in the URL: httpx's to judge
        origin_text, (path, mark, query) = text[:slash], text[slash:].partition("?")
        if (
            not _PLAIN_PATH.fullmatch(path)
            or (mark and not _PLAIN_QUERY.fullmatch(query))
            or _DOT_SEGMENT.search(path)
            or any(c in origin_text for c in "?#\\")
        ):
            return httpx.URL(text)
        origin = self._origins.get(origin_text)
        if origin is None:
            origin = httpx.URL(origin_text)
            if len(self._origins) >= self.LIMIT:
                self._origins.clear()
            self._origins[origin_text] = origin
        return _with_target(origin, path, query if mark else None)


def _with_target(origin: httpx.URL, path: str, query: str | None) -> httpx.URL:
    """``origin`` with ``path`` and ``query``, which httpx would have kept as they are.

    httpx.URL has no public constructor from parsed parts (``copy_with`` parses all
    over again): this sets its parsed form, a NamedTuple (the same in httpx 0.27 and
    0.28; ``tests/test_upstream.py`` compares the result with httpx's own parse).
    """
    url = httpx.URL.__new__(httpx.URL)
    url._uri_reference = origin._uri_reference._replace(path=path, query=query)
    return url


_URLS = _URLs()


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


class SharedClient(httpx.AsyncClient):
    """httpx's client whose cookie jar stays empty, over our transport.

    The client is shared by every source and tenant: a cookie one upstream sets must
    never ride along on another source's request. Not extracting them at all also
    spares each response httpx's cookie parsing (two urllib adapters and a jar pass,
    ~130 µs of a miss's CPU on a busy machine).
    """

    def __init__(self, transport: PooledTransport, **options: Any) -> None:
        super().__init__(transport=transport, **options)
        self._pooled = transport

    @property
    def cookies(self) -> httpx.Cookies:
        return _NO_COOKIES

    @cookies.setter
    def cookies(self, cookies: object) -> None:
        raise TypeError("the shared upstream client keeps no cookies")

    async def exchange(self, request: httpx.Request) -> httpx.Response:
        """``send(request, stream=True)`` for a request that needs none of its layers:
        no auth (none is set on this client; a URL with credentials is sent by ``send``),
        no redirect (``next_request`` stays unset), no event hooks (none is set), no
        cookies: the transport's answer itself, its body unread."""
        if self.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        response = await self._pooled.handle_async_request(request)
        response.request = request
        return response


def create_client(
    egress: EgressPolicy | None = None, ssl_context: ssl.SSLContext | None = None
) -> SharedClient:
    """The one shared client; without a policy, the built-in denies apply.

    The transport is ours (``proxy.transport``): httpx's default one, over httpcore's
    pool, spends CPU per request that grows with the number of connections.
    """
    transport = PooledTransport(
        EgressDialer(egress or EgressPolicy.parse()), limits=LIMITS, ssl_context=ssl_context
    )
    # Redirects are not followed here: a 3xx is an answer, unless the source asks (fetch).
    return SharedClient(
        transport,
        follow_redirects=False,
        timeout=httpx.Timeout(10.0),
        trust_env=False,
        headers={"Accept-Encoding": ACCEPT_ENCODING},
    )


def _maybe_sent(exc: Exception) -> bool:
    """Whether the upstream may have received the request: only a connection that was
    never made (refused, unresolvable, connect or pool timeout) proves it did not."""
    return not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


_SENDS_LENGTH = frozenset(("POST", "PUT", "PATCH"))
"""Methods httpx gives a ``Content-Length: 0`` when they have no body."""


class Upstream:
    def __init__(self, client: SharedClient) -> None:
        self.client = client
        # The client's headers (Accept-Encoding and httpx's defaults) as build_request
        # merges them: each one unless the request names it too.
        self._defaults = [(name, name.lower(), value) for name, value in client.headers.raw]

    def build(self, request: RenderedRequest, timeout: float) -> httpx.Request:
        """The ``httpx.Request`` that ``client.build_request`` makes of ``request``, made
        without its per-call work (URL and header merging, a new ``Timeout``, the body
        encoded and the headers rebuilt twice): the same method, URL, headers in the same
        order (``Host`` and ``Content-Length`` where httpx adds them), body and timeouts
        (``tests/test_upstream.py`` compares the two)."""
        url = full_url(request)
        own = httpx.Headers(request.headers).raw if request.headers else []
        names = {name.lower() for name, _ in own}
        headers = [(name, value) for name, lower, value in self._defaults if lower not in names]
        headers += own
        body = request.content or b""
        if body and b"content-length" not in names:
            headers.append((b"Content-Length", str(len(body)).encode("ascii")))
            names.add(b"content-length")
        auto = [] if b"host" in names else [(b"Host", url.netloc)]
        method = request.method.upper()
        if method in _SENDS_LENGTH and not names & {b"content-length", b"transfer-encoding"}:
            auto.append((b"Content-Length", b"0"))
        each = {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
        deadline = asyncio.get_running_loop().time() + timeout
        return httpx.Request(
            method,
            url,
            headers=auto + headers,
            stream=httpx.ByteStream(body),
            extensions={"timeout": each, DEADLINE: deadline},
        )

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
        built = self.build(request, timeout)
        if follow_redirects or built.url.userinfo:
            # httpx's layers: next_request for a redirect, Basic auth from the URL.
            response = await self.client.send(built, stream=True)
        else:
            response = await self.client.exchange(built)
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
            declared, encoding = _framing(response.headers)
            if declared.isdigit() and int(declared) > max_bytes:
                raise ResponseTooLarge(max_bytes)
            stream = response.stream
            if encoding is None and isinstance(stream, Body):
                # Nothing to decode: the body in one piece, from the transport itself.
                content = await stream.read(max_bytes)
                if content is None:
                    raise ResponseTooLarge(max_bytes)
                return response.status_code, content, response.headers
            chunks: list[bytes] = []
            size = 0
            # Not aiter_bytes: httpx inflates each read whole, a bomb before the cap sees it.
            # Our transport's body is read as it is; aiter_raw wraps any other.
            raw = stream if isinstance(stream, Body) else response.aiter_raw()
            async for chunk in decoded(raw, encoding):
                size += len(chunk)
                if size > max_bytes:
                    raise ResponseTooLarge(max_bytes)
                chunks.append(chunk)
            return response.status_code, b"".join(chunks), response.headers
        finally:
            await response.aclose()


def _framing(headers: httpx.Headers) -> tuple[bytes, str | None]:
    """The declared length (b"" if none) and the content codings (None if none), in one
    pass over the raw headers; repeated headers joined as httpx joins them."""
    length: list[bytes] = []
    codings: list[bytes] = []
    for name, value in headers.raw:
        lowered = name.lower()
        if lowered == b"content-length":
            length.append(value)
        elif lowered == b"content-encoding":
            codings.append(value)
    return b", ".join(length), b", ".join(codings).decode("latin-1") if codings else None
