"""The upstream transport: httpx's client API over a connection pool of our own.

httpx's default transport pools through httpcore, whose pool does not scale
with concurrency (README, "Misses at scale", has the measurements): every new
request and every closed response runs a pass over all connections and all
waiting requests; a connection that turns idle is offered to every waiting
request at once, and the losers wake, fail and pass again; idle connections are
evicted once the pool holds more than ``max_keepalive_connections`` connections,
busy ones counted; and every pass polls each idle socket. At 128 concurrent
requests that was ~24 ms of CPU per request and 41 req/s against a 200 ms
upstream. Here each step is O(1):

- idle connections sit per origin in an insertion-ordered dict used as a stack:
  a request takes the most recently used one; on each release the oldest is
  checked for keep-alive expiry;
- a server closing an idle connection is seen when it happens
  (``connection_lost``), never polled;
- a released connection goes to the first waiting request, and only to it;
- HTTP/1.1 responses are parsed by httptools (llhttp, the parser uvicorn uses)
  inside an ``asyncio.Protocol``: no stream layer between the socket and the parser.

Every connection is opened by ``proxy.egress.EgressDialer`` (policy checked on
the resolved addresses, the checked address dialled). Errors are httpx's own
(``ConnectError``, ``ReadTimeout``, ``RemoteProtocolError``…), so callers see
what httpx's default transport raises. HTTP/1.1 only, no proxies: what the
broker uses.
"""

from __future__ import annotations

import asyncio
import math
import re
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import cast

import httptools
import httpx

from proxy.egress import EgressDialer

Origin = tuple[bytes, bytes, int]

# A response head (status line and headers) larger than this is refused: h11, under
# httpcore, had the same kind of bound (100 KiB); llhttp alone has none.
MAX_HEAD_BYTES = 100 * 1024
# Body bytes buffered ahead of the reader before the socket is paused, and the level at
# which it resumes: a fast upstream cannot push more than this into memory.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FORBIDDEN_IN_VALUE = re.compile(rb"[\r\n\0]")
_FORBIDDEN_IN_TARGET = re.compile(rb"[\x00-\x20\x7f]")
_NO_BODY = frozenset((204, 304))

DEADLINE = "databroker.deadline"
"""A request extension: the event loop's time (``loop.time()``) by which the whole exchange,
the body read included, must be done. Each wait is cut to what is left of it and times out
as httpx's own timeouts do: an overall bound without a timer of its own per request."""


def _cut(timeout: float | None, deadline: float | None) -> float | None:
    """``timeout``, or what is left until ``deadline`` if that is less."""
    if deadline is None:
        return timeout
    left = deadline - asyncio.get_running_loop().time()
    return left if timeout is None else min(timeout, left)


class _StopParsing(Exception):
    """Raised from a parser callback: llhttp stops, feed_data raises HttpParserCallbackError."""


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: the protocol the event loop feeds, and one exchange at a time."""

    def __init__(self, pool: _Pool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.counted = True  # holds one of the pool's max_connections slots
        self.in_use = True
        self.closed = False
        self.idle_since = 0.0
        self.error: httpx.TransportError | None = None
        self.deadline: float | None = None  # the current exchange's (DEADLINE)
        self._waiter: asyncio.Future[None] | None = None
        self._writable = True
        self._reset(False)

    def _reset(self, head_request: bool) -> None:
        self.head_request = head_request
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.message_done = False
        self.keep_alive = False
        self.until_eof = False
        self.informational = False
        self.head_bytes = 0
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False

    # --- asyncio.Protocol, called by the event loop ------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have asyncio.Transport's methods without being its subclass.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.in_use:
            # Bytes nobody asked for: a server closing the connection, or a broken one.
            self._fail(httpx.RemoteProtocolError("unexpected data on an idle connection"))
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(httpx.RemoteProtocolError("the upstream switched protocols"))
            return
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"malformed response: {exc}"))
            return
        if not self.headers_done:
            # Everything fed so far belongs to the head (or to a 1xx before it).
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self._fail(httpx.RemoteProtocolError("response head too large"))
                return
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        return False  # close our side too: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.in_use and not self.message_done and self.error is None:
            if self.headers_done and self.until_eof and exc is None:
                # A body delimited by the end of the connection (no length, not chunked).
                self.message_done = True
            elif exc is not None:
                self.error = httpx.ReadError(f"connection lost: {type(exc).__name__}")
            elif self.headers_done:
                self.error = httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body"
                )
            else:
                self.error = httpx.RemoteProtocolError(
                    "Server disconnected without sending a response."
                )
        self._writable = True
        self._wake()
        self.pool.forget(self)

    def pause_writing(self) -> None:
        self._writable = False

    def resume_writing(self) -> None:
        self._writable = True
        self._wake()

    # --- httptools callbacks, called from feed_data ------------------------------------

    def on_message_begin(self) -> None:
        if self.message_done:
            # A second answer to one request: the connection's framing cannot be trusted.
            # Raising stops llhttp here, so nothing of it reaches the answer already read.
            self.error = httpx.RemoteProtocolError("unexpected data after the response")
            raise _StopParsing
        self.headers = []
        self.reason = b""

    def on_status(self, status: bytes) -> None:
        self.reason += status  # may come in pieces when the status line is split

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self.informational = True  # 100 Continue and the like: the answer follows
            return
        self.status = status
        self.headers_done = True
        if self.head_request:
            # llhttp cannot tell an answer to HEAD has no body: the exchange ends here,
            # and the connection with it (a declared length would be read as the next answer).
            self.message_done = True
            return
        if status in _NO_BODY:
            return
        delimited = False
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"content-length" or (
                lowered == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                delimited = True
                break
        self.until_eof = not delimited

    def on_body(self, body: bytes) -> None:
        if self.message_done:
            return  # a body sent with an answer to HEAD is not part of it
        self.body.append(body)
        self.buffered += len(body)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        self.message_done = True
        self.keep_alive = self.parser.should_keep_alive() and not self.head_request

    # --- one exchange ------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: httpx.TransportError) -> None:
        if self.error is None:
            self.error = error
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()  # connection_lost follows, from the loop

    async def _wait(self, timeout: float | None, expired: type[httpx.TimeoutException]) -> None:
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = None
        timeout = _cut(timeout, self.deadline)
        if timeout is not None:
            timer = loop.call_later(timeout, _expire, waiter, expired)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def send(
        self,
        request: httpx.Request,
        head: bytes,
        timeout: float | None,
        deadline: float | None = None,
    ) -> None:
        self._reset(request.method == "HEAD")
        self.deadline = deadline
        transport = self.transport
        if self.closed or transport is None:
            raise httpx.WriteError("connection closed before the request was sent")
        stream = request.stream
        if isinstance(stream, httpx.ByteStream):
            # One write, head and body together (a ByteStream iterates synchronously too,
            # read or not: httpx builds redirect hops without reading them).
            transport.write(head + b"".join(stream))
        else:
            assert isinstance(stream, httpx.AsyncByteStream)
            chunked = request.headers.get("transfer-encoding", "").lower() == "chunked"
            transport.write(head)
            async for chunk in stream:
                if chunk:
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                await self._drain(timeout)
            if chunked:
                transport.write(b"0\r\n\r\n")
        await self._drain(timeout)

    async def _drain(self, timeout: float | None) -> None:
        # A connection lost while writing says why when the answer is awaited.
        while not self._writable and self.error is None and not self.closed:
            await self._wait(timeout, httpx.WriteTimeout)

    async def receive_head(self, timeout: float | None) -> None:
        while not self.headers_done:
            if self.error is not None:
                raise self.error
            await self._wait(timeout, httpx.ReadTimeout)

    async def next_chunk(self, timeout: float | None) -> bytes | None:
        """The next piece of the body, or None once it is complete."""
        while True:
            body = self.body
            if body:
                if len(body) == 1:
                    chunk = body.popleft()
                else:
                    chunk = b"".join(body)
                    body.clear()
                self.buffered -= len(chunk)
                if self.paused and self.buffered < LOW_WATER and self.transport is not None:
                    self.paused = False
                    self.transport.resume_reading()
                return chunk
            if self.message_done:
                return None
            if self.error is not None:
                raise self.error
            await self._wait(timeout, httpx.ReadTimeout)


def _expire(waiter: asyncio.Future[None], expired: type[httpx.TimeoutException]) -> None:
    if not waiter.done():
        waiter.set_exception(expired("timed out"))


class Body(httpx.AsyncByteStream):
    """A response body: read from its connection, which goes back to the pool once done."""

    def __init__(self, pool: _Pool, connection: _Connection, timeout: float | None) -> None:
        self._pool = pool
        self._connection: _Connection | None = connection
        self._timeout = timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None:
            raise httpx.StreamClosed()
        while True:
            chunk = await connection.next_chunk(self._timeout)
            if chunk is None:
                self._done()
                return
            yield chunk

    async def read(self, limit: int) -> bytes | None:
        """The whole body in one piece, or None as soon as it passes ``limit`` bytes (the
        rest is not read; closing the response drops the connection)."""
        connection = self._connection
        if connection is None:
            raise httpx.StreamClosed()
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = await connection.next_chunk(self._timeout)
            if chunk is None:
                self._done()
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)

    async def aclose(self) -> None:
        self._done()

    def _done(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            self._pool.release(connection)


class _Pool:
    """Connections by origin, at most ``max_connections`` of them, idle ones in a stack."""

    def __init__(
        self,
        dialer: EgressDialer,
        ssl_context: ssl.SSLContext | None,
        limits: httpx.Limits,
    ) -> None:
        self.dialer = dialer
        self.ssl_context = ssl_context  # None until the first https dial: see ``_tls``
        self.max_connections = limits.max_connections or 2**31
        keepalive = limits.max_keepalive_connections
        self.max_idle = self.max_connections if keepalive is None else keepalive
        self.expiry = math.inf if limits.keepalive_expiry is None else limits.keepalive_expiry
        self.count = 0  # connections open or opening
        self.idle: dict[Origin, dict[_Connection, None]] = {}
        self.idle_count = 0
        # A waiter's future gets a connection of its origin, or None: a slot to open one.
        self.waiters: deque[tuple[Origin, asyncio.Future[_Connection | None]]] = deque()
        self.closed = False

    async def acquire(
        self, origin: Origin, timeouts: dict[str, float | None], deadline: float | None = None
    ) -> _Connection:
        connection = self._pop_idle(origin)
        if connection is not None:
            return connection
        if self.count < self.max_connections:
            self.count += 1
        elif not self._close_an_idle_connection():
            got = await self._wait_turn(origin, _cut(timeouts.get("pool"), deadline))
            if got is not None:
                return got
        return await self._open(origin, _cut(timeouts.get("connect"), deadline))

    async def _wait_turn(self, origin: Origin, timeout: float | None) -> _Connection | None:
        turn: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
        self.waiters.append((origin, turn))
        try:
            async with asyncio.timeout(timeout):
                return await turn
        except BaseException as exc:
            # Given a turn, then cancelled before taking it: pass it on.
            if turn.done() and not turn.cancelled():
                given = turn.result()
                if given is None:
                    self._free_slot()
                else:
                    self.release(given)
            if isinstance(exc, TimeoutError):
                raise httpx.PoolTimeout("no connection available within the pool timeout") from exc
            raise

    def _tls(self) -> ssl.SSLContext:
        """httpx's verifying context, made on the first https dial: loading the CA bundle
        costs ~2 MiB that a sidecar whose upstreams are all plain HTTP never needs."""
        if self.ssl_context is None:
            self.ssl_context = httpx.create_ssl_context(trust_env=False)
        return self.ssl_context

    async def _open(self, origin: Origin, timeout: float | None) -> _Connection:
        """A new connection in a slot already counted; the slot is freed if it fails."""
        scheme, raw_host, port = origin
        host = raw_host.decode("ascii")
        connection = _Connection(self, origin)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                sock = await self.dialer.connect_tcp(host, port)
                try:
                    await loop.create_connection(
                        lambda: connection,
                        sock=sock,
                        ssl=self._tls() if scheme == b"https" else None,
                        # TLS checks the URL's host, not the address dialled.
                        server_hostname=host if scheme == b"https" else None,
                    )
                except BaseException:
                    sock.close()
                    raise
        except BaseException as exc:
            self.forget(connection)
            if isinstance(exc, TimeoutError):
                raise httpx.ConnectTimeout(f"connecting to {host!r} timed out") from exc
            if isinstance(exc, OSError):  # refused, unreachable, unresolvable, TLS refused
                raise httpx.ConnectError(f"cannot connect: {exc}") from exc
            raise
        return connection

    def _pop_idle(self, origin: Origin) -> _Connection | None:
        stack = self.idle.get(origin)
        while stack:
            connection = next(reversed(stack))  # the most recently used
            self._take_idle(connection)
            if time.monotonic() - connection.idle_since > self.expiry:
                self.discard(connection)
                continue
            connection.in_use = True
            return connection
        return None

    def _close_an_idle_connection(self) -> bool:
        """At the limit: close the oldest idle connection of some origin, keeping its slot."""
        if not self.idle:
            return False
        connection = next(iter(next(iter(self.idle.values()))))
        self._take_idle(connection)
        connection.counted = False  # the slot goes to the caller
        connection.close()
        return True

    def _take_idle(self, connection: _Connection) -> None:
        # An origin without idle connections has no entry: redirect hops to many hosts
        # leave nothing behind.
        stack = self.idle[connection.origin]
        del stack[connection]
        self.idle_count -= 1
        if not stack:
            del self.idle[connection.origin]

    def release(self, connection: _Connection) -> None:
        """A finished exchange: the connection goes to a waiter, the idle stack, or away."""
        reusable = (
            connection.message_done
            and connection.keep_alive
            and connection.error is None
            and not connection.closed
            and not self.closed
        )
        if not reusable:
            self.discard(connection)
            return
        connection.in_use = False
        while self.waiters:
            origin, turn = self.waiters.popleft()
            if turn.done():
                continue  # timed out or cancelled
            if origin == connection.origin:
                connection.in_use = True
                turn.set_result(connection)
            else:
                connection.counted = False  # its slot goes to the waiter
                connection.close()
                turn.set_result(None)
            return
        if self.idle_count >= self.max_idle:
            self.discard(connection)
            return
        now = time.monotonic()
        connection.idle_since = now
        stack = self.idle.get(connection.origin)
        if stack:
            # The origin's oldest, checked on each release (O(1)): stale connections at
            # the bottom of a busy stack go one per release; the rest when popped or
            # when their server closes them.
            oldest = next(iter(stack))
            if now - oldest.idle_since > self.expiry:
                self.discard(oldest)
        self.idle.setdefault(connection.origin, {})[connection] = None
        self.idle_count += 1

    def discard(self, connection: _Connection) -> None:
        connection.close()
        self.forget(connection)

    def forget(self, connection: _Connection) -> None:
        """Drop ``connection`` from the pool (idempotent); its slot goes to a waiter or back."""
        if connection in self.idle.get(connection.origin, ()):
            self._take_idle(connection)
        if connection.counted:
            connection.counted = False
            self._free_slot()

    def _free_slot(self) -> None:
        while self.waiters:
            _, turn = self.waiters.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot changes hands: count unchanged
                return
        self.count -= 1

    def close(self) -> None:
        self.closed = True
        for stack in list(self.idle.values()):
            for connection in list(stack):
                self.discard(connection)


class PooledTransport(httpx.AsyncBaseTransport):
    """httpx's transport interface over ``_Pool``: what ``httpx.AsyncClient(transport=…)`` takes."""

    def __init__(
        self,
        dialer: EgressDialer,
        *,
        limits: httpx.Limits,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._pool = _Pool(dialer, ssl_context, limits)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        scheme = url.raw_scheme
        if scheme not in (b"http", b"https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}")
        origin = (scheme, url.raw_host, url.port or (443 if scheme == b"https" else 80))
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        head = _head(request)
        pool = self._pool
        deadline: float | None = request.extensions.get(DEADLINE)
        connection = await pool.acquire(origin, timeouts, deadline)
        try:
            await connection.send(request, head, timeouts.get("write"), deadline)
            await connection.receive_head(timeouts.get("read"))
        except BaseException as exc:
            pool.discard(connection)
            if isinstance(exc, httpx.TransportError):
                exc.request = request
            raise
        version = connection.parser.get_http_version()
        return httpx.Response(
            connection.status,
            headers=connection.headers,
            stream=Body(pool, connection, timeouts.get("read")),
            extensions={
                "http_version": b"HTTP/" + version.encode("ascii"),
                "reason_phrase": connection.reason,
            },
        )

    async def aclose(self) -> None:
        self._pool.close()


def _head(request: httpx.Request) -> bytes:
    """The request line and headers, refused (LocalProtocolError) if any would break framing."""
    method = request.method.encode("ascii")
    target = request.url.raw_path
    if not _TOKEN.fullmatch(method) or _FORBIDDEN_IN_TARGET.search(target):
        raise httpx.LocalProtocolError("invalid request line", request=request)
    parts: list[bytes] = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in request.headers.raw:
        if not _TOKEN.fullmatch(name) or _FORBIDDEN_IN_VALUE.search(value):
            raise httpx.LocalProtocolError("invalid header name or value", request=request)
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)
