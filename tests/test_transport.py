"""proxy.transport against real servers on 127.0.0.1: pooling, framing, limits, timeouts, TLS.

Most servers here are raw asyncio TCP servers so that each test controls the
exact bytes on the wire (a truncated body, a 100 Continue, a server closing an
idle connection); TLS goes through uvicorn with a certificate made here. The
tests run on the standard event loop; ``test_on_uvloop`` runs the main ones
again on uvloop, the broker's loop, whose transports are not asyncio's.
"""

from __future__ import annotations

import asyncio
import datetime
import inspect
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.egress import EgressDialer, EgressPolicy
from proxy.transport import DEADLINE, HIGH_WATER, PooledTransport, _head
from proxy.upstream import create_client
from tests.harness import async_wait_for, free_port
from tests.servers import Upstream as UpstreamServer
from tests.servers import serve_in_thread

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A TCP server on 127.0.0.1 running ``handler`` per connection, counting connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0
        self.open = 0
        self.most_open = 0
        self.url = ""
        self._server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()


async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request on the connection with ``OK``."""
    while True:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(OK)
        await writer.drain()


def answer_once(response: bytes, then_close: bool = True) -> Handler:
    """Reads one request head, writes ``response``, and closes (or holds) the connection."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)
        await writer.drain()
        if not then_close:
            await reader.read()  # until the client hangs up

    return handler


async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()


def transport(
    max_connections: int = 8, max_keepalive_connections: int = 8, keepalive_expiry: float = 5.0
) -> PooledTransport:
    limits = httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_keepalive_connections,
        keepalive_expiry=keepalive_expiry,
    )
    return PooledTransport(EgressDialer(EgressPolicy.parse()), limits=limits)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=transport(), timeout=5) as c:
        yield c


def pool_of(client: httpx.AsyncClient) -> PooledTransport:
    pooled = client._transport
    assert isinstance(pooled, PooledTransport)
    return pooled


# --- pooling -------------------------------------------------------------------------------


async def test_sequential_requests_reuse_one_connection(client: httpx.AsyncClient) -> None:
    async with RawServer(keep_alive) as server:
        for _ in range(5):
            assert (await client.get(server.url)).content == b"ok"
    assert server.accepted == 1
    # Plain HTTP only: no TLS context was made (it costs RSS, README "Footprint").
    assert pool_of(client)._pool.ssl_context is None


async def test_concurrent_requests_reuse_their_connections(client: httpx.AsyncClient) -> None:
    async with RawServer(keep_alive) as server:
        for _ in range(3):
            answers = await asyncio.gather(*(client.get(server.url) for _ in range(8)))
            assert [a.content for a in answers] == [b"ok"] * 8
    assert server.accepted <= 8


async def test_requests_beyond_the_limit_wait_for_a_released_connection() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(0.01)  # the server's own pace, so requests overlap
            writer.write(OK)
            await writer.drain()

    async with (
        RawServer(slow) as server,
        httpx.AsyncClient(transport=transport(max_connections=2), timeout=5) as client,
    ):
        answers = await asyncio.gather(*(client.get(server.url) for _ in range(20)))
    assert [a.status_code for a in answers] == [200] * 20
    assert server.most_open <= 2
    assert server.accepted == 2  # each released connection went to a waiter, none reopened


async def test_at_the_limit_an_idle_connection_to_another_origin_makes_room() -> None:
    async with (
        RawServer(keep_alive) as first,
        RawServer(keep_alive) as second,
        httpx.AsyncClient(transport=transport(max_connections=1), timeout=5) as client,
    ):
        await client.get(first.url)
        assert (await client.get(second.url)).content == b"ok"
        await async_wait_for(lambda: first.open == 0)


async def test_a_waiter_for_another_origin_gets_the_released_slot() -> None:
    answer = asyncio.Event()

    async def gated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            await answer.wait()
            writer.write(OK)
            await writer.drain()

    async with (
        RawServer(gated) as busy,
        RawServer(keep_alive) as other,
        httpx.AsyncClient(transport=transport(max_connections=1), timeout=5) as client,
    ):
        pool = pool_of(client)._pool
        first = asyncio.create_task(client.get(busy.url))
        await async_wait_for(lambda: busy.accepted == 1)
        second = asyncio.create_task(client.get(other.url))
        await async_wait_for(lambda: len(pool.waiters) == 1)
        answer.set()
        assert [(await first).content, (await second).content] == [b"ok", b"ok"]
        await async_wait_for(lambda: busy.open == 0)  # closed to make room
        assert pool.count == 1


async def test_pool_timeout_when_no_connection_frees_up() -> None:
    async with (
        RawServer(never_answer) as server,
        httpx.AsyncClient(transport=transport(max_connections=1), timeout=5) as client,
    ):
        holder = asyncio.create_task(client.get(server.url))
        await async_wait_for(lambda: server.accepted == 1)
        with pytest.raises(httpx.PoolTimeout):
            await client.get(server.url, timeout=httpx.Timeout(5, pool=0.05))
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder
        assert pool_of(client)._pool.count == 0  # the cancelled request gave its slot back


async def test_an_idle_connection_the_server_closed_is_not_reused(
    client: httpx.AsyncClient,
) -> None:
    """Seen when the server closes it (no poll per request), and dropped from the pool."""
    async with RawServer(answer_once(OK)) as server:
        assert (await client.get(server.url)).content == b"ok"
        pool = pool_of(client)._pool
        await async_wait_for(lambda: pool.count == 0)
        assert (pool.idle_count, pool.idle) == (0, {})  # no empty entry left for the origin
        assert (await client.get(server.url)).content == b"ok"
    assert server.accepted == 2


async def test_busy_connections_do_not_count_against_the_keepalive_bound() -> None:
    """httpcore counted busy connections too: past the bound, every connection that turned
    idle was closed and the next request reconnected (one connect per request at its
    default limits under load)."""
    release = asyncio.Event()

    async def by_path(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"GET /slow "):
                await release.wait()
            writer.write(OK)
            await writer.drain()

    async with (
        RawServer(by_path) as server,
        httpx.AsyncClient(
            transport=transport(max_connections=8, max_keepalive_connections=2), timeout=5
        ) as client,
    ):
        busy = [asyncio.create_task(client.get(f"{server.url}/slow")) for _ in range(3)]
        await async_wait_for(lambda: server.accepted == 3)
        for _ in range(3):  # one idle connection beside three busy ones: kept and reused
            assert (await client.get(f"{server.url}/fast")).content == b"ok"
        assert server.accepted == 4
        release.set()
        await asyncio.gather(*busy)


async def test_an_expired_idle_connection_is_replaced() -> None:
    async with (
        RawServer(keep_alive) as server,
        httpx.AsyncClient(transport=transport(keepalive_expiry=0.0), timeout=5) as client,
    ):
        await client.get(server.url)
        await client.get(server.url)
        await async_wait_for(lambda: server.open == 1)  # the expired one was closed
    assert server.accepted == 2


async def test_connections_beyond_the_keepalive_bound_are_closed() -> None:
    async with (
        RawServer(keep_alive) as server,
        httpx.AsyncClient(
            transport=transport(max_connections=4, max_keepalive_connections=1), timeout=5
        ) as client,
    ):
        await asyncio.gather(*(client.get(server.url) for _ in range(4)))
        assert pool_of(client)._pool.idle_count <= 1
        await async_wait_for(lambda: server.open <= 1)


async def test_a_refused_connection_is_a_connect_error_and_frees_its_slot(
    client: httpx.AsyncClient,
) -> None:
    with pytest.raises(httpx.ConnectError):
        await client.get(f"http://127.0.0.1:{free_port()}/")
    assert pool_of(client)._pool.count == 0


async def test_a_cancelled_request_discards_its_connection(client: httpx.AsyncClient) -> None:
    async with RawServer(never_answer) as server:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await client.get(server.url)
        assert pool_of(client)._pool.count == 0
        await async_wait_for(lambda: server.open == 0)


async def test_read_timeout(client: httpx.AsyncClient) -> None:
    async with RawServer(never_answer) as server:
        with pytest.raises(httpx.ReadTimeout):
            await client.get(server.url, timeout=httpx.Timeout(5, read=0.05))
        assert pool_of(client)._pool.count == 0


async def test_the_deadline_cuts_every_wait(client: httpx.AsyncClient) -> None:
    """A body dripping within each read timeout still ends at the request's deadline."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"

    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head)
        for _ in range(1000):
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.02)

    async with RawServer(drip) as server:
        request = client.build_request("GET", server.url, timeout=5)
        request.extensions[DEADLINE] = asyncio.get_running_loop().time() + 0.3
        response = await client.send(request, stream=True)
        with pytest.raises(httpx.ReadTimeout):
            await response.aread()
        await response.aclose()
        assert pool_of(client)._pool.count == 0


# --- framing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "body"),
    [
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            b"abcde",
        ),
        (b"HTTP/1.0 200 OK\r\n\r\nuntil the end", b"until the end"),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end", b"until the end"),
        (b"HTTP/1.1 100 Continue\r\n\r\n" + OK, b"ok"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
    ],
    ids=["chunked", "http-1.0-until-close", "close-delimited", "100-continue", "204"],
)
async def test_bodies_are_framed_as_the_response_says(
    client: httpx.AsyncClient, response: bytes, body: bytes
) -> None:
    async with RawServer(answer_once(response)) as server:
        answer = await client.get(server.url)
    assert answer.content == body


@pytest.mark.parametrize("body", [b"", b"0123456789"], ids=["as-it-should", "body-sent-anyway"])
async def test_head_response_ends_at_its_headers(client: httpx.AsyncClient, body: bytes) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
    async with RawServer(answer_once(head + body, then_close=False)) as server:
        answer = await client.head(server.url)
    assert (answer.status_code, answer.content) == (200, b"")


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (b"", "Server disconnected without sending a response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "without sending complete message"),
        (b"HTTP/1.1 2x0 OK\r\n\r\n", "malformed response"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n", "head too large"),
    ],
    ids=["no-response", "truncated-body", "bad-status", "huge-head"],
)
async def test_broken_responses_are_remote_protocol_errors(
    client: httpx.AsyncClient, response: bytes, message: str
) -> None:
    async with RawServer(answer_once(response)) as server:
        with pytest.raises(httpx.RemoteProtocolError, match=message):
            await client.get(server.url)
    assert pool_of(client)._pool.count == 0


async def test_bytes_after_a_complete_response_end_the_connection(
    client: httpx.AsyncClient,
) -> None:
    """A second answer to one request: the first stands, the connection is not reused."""
    async with RawServer(answer_once(OK + OK, then_close=False)) as server:
        assert (await client.get(server.url)).content == b"ok"
        await async_wait_for(lambda: pool_of(client)._pool.count == 0)
        await async_wait_for(lambda: server.open == 0)


async def test_a_slow_reader_pauses_the_socket() -> None:
    """A body arriving faster than it is read is held to the high-water mark, not in full."""
    size = 16 * 1024 * 1024
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
    pooled = transport()
    async with RawServer(answer_once(head + b"x" * size)) as server:
        request = httpx.Request("GET", server.url)
        port = request.url.port
        assert port is not None
        connection = await pooled._pool.acquire((b"http", b"127.0.0.1", port), {})
        await connection.send(request, _head(request), None)
        await connection.receive_head(None)
        received = len(await connection.next_chunk(None) or b"")
        await async_wait_for(lambda: connection.paused)
        assert connection.buffered < HIGH_WATER + 512 * 1024
        while (chunk := await connection.next_chunk(None)) is not None:
            received += len(chunk)
        pooled._pool.release(connection)
    assert received == size


async def test_streamed_request_bodies_are_sent_chunked(upstream: UpstreamServer) -> None:
    url = upstream.answer("/echo", b"{}")

    async def parts() -> AsyncIterator[bytes]:
        for part in (b"first,", b"", b"second"):
            yield part

    async with create_client() as client:
        answer = await client.post(url, content=parts())
    assert answer.status_code == 200
    assert upstream.received[0]["body"] == b"first,second"
    assert upstream.received[0]["headers"]["transfer-encoding"] == "chunked"


@pytest.mark.parametrize(
    "headers",
    [{"X-Evil": "a\r\nInjected: yes"}, {"X-Evil": "a\nb"}, {"Bad Name": "x"}],
    ids=["crlf", "lf", "space-in-name"],
)
async def test_headers_that_would_break_framing_are_refused_before_connecting(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    async with RawServer(keep_alive) as server:
        with pytest.raises(httpx.LocalProtocolError):
            await client.get(server.url, headers=headers)
    assert server.accepted == 0


async def test_unsupported_scheme(client: httpx.AsyncClient) -> None:
    with pytest.raises(httpx.UnsupportedProtocol):
        await client.get("ftp://127.0.0.1/")


# --- TLS -----------------------------------------------------------------------------------


def _certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``name`` alone: its PEM file and its key's."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name)]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """An HTTPS upstream whose certificate names ``localhost``; yields its port and the cert."""
    cert, key = _certificate(tmp_path_factory.mktemp("tls"), "localhost")

    async def hello(request: Request) -> Response:
        return Response(request.url.hostname or "", media_type="text/plain")

    app = Starlette(routes=[Route("/{path:path}", hello)])
    with serve_in_thread(app, ssl_certfile=str(cert), ssl_keyfile=str(key)) as base:
        yield base.rsplit(":", 1)[1], cert


async def test_tls_verifies_the_url_host_while_dialling_the_checked_address(
    tls_upstream: tuple[str, Path],
) -> None:
    port, cert = tls_upstream
    trusting = ssl.create_default_context(cafile=str(cert))
    async with create_client(ssl_context=trusting) as client:
        for _ in range(2):  # the second over the pooled TLS connection
            answer = await client.get(f"https://localhost:{port}/")
            assert (answer.status_code, answer.text) == (200, "localhost")
        assert answer.http_version == "HTTP/1.1"


async def test_tls_refuses_an_untrusted_certificate(tls_upstream: tuple[str, Path]) -> None:
    port, _ = tls_upstream
    async with create_client() as client:  # the system's CAs: a self-signed cert fails
        pool = pool_of(client)._pool
        assert pool.ssl_context is None  # made on the first https dial
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.get(f"https://localhost:{port}/")
        made = pool.ssl_context
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.get(f"https://localhost:{port}/")
        assert made is not None and pool.ssl_context is made  # once, then reused


async def test_tls_refuses_a_certificate_for_another_name(tls_upstream: tuple[str, Path]) -> None:
    """Trusted, but issued to ``localhost``: reached as 127.0.0.1, the name does not match."""
    port, cert = tls_upstream
    trusting = ssl.create_default_context(cafile=str(cert))
    async with create_client(ssl_context=trusting) as client:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.get(f"https://127.0.0.1:{port}/")


# --- on uvloop -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        test_sequential_requests_reuse_one_connection,
        test_requests_beyond_the_limit_wait_for_a_released_connection,
        test_busy_connections_do_not_count_against_the_keepalive_bound,
        test_an_idle_connection_the_server_closed_is_not_reused,
        test_a_cancelled_request_discards_its_connection,
        test_bytes_after_a_complete_response_end_the_connection,
        test_a_slow_reader_pauses_the_socket,
        test_tls_verifies_the_url_host_while_dialling_the_checked_address,
        test_tls_refuses_an_untrusted_certificate,
    ],
    ids=lambda case: case.__name__.removeprefix("test_"),
)
def test_on_uvloop(case: Callable[..., Awaitable[None]], tls_upstream: tuple[str, Path]) -> None:
    async def run() -> None:
        wanted = inspect.signature(case).parameters
        async with httpx.AsyncClient(transport=transport(), timeout=5) as client:
            given = {"client": client, "tls_upstream": tls_upstream}
            await case(**{name: given[name] for name in wanted})

    uvloop.run(run())
