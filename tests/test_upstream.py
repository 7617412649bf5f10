"""proxy.upstream against a real HTTP server: success, retries, timeouts, size caps."""

from __future__ import annotations

import asyncio
import gzip
import random
import time
import zlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import parse_qsl

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from proxy.errors import (
    ResponseTooLarge,
    UpstreamConnectError,
    UpstreamHTTPError,
    UpstreamTimeout,
)
from proxy.retry import Retrying
from proxy.templates import RenderedRequest
from proxy.transport import DEADLINE
from proxy.upstream import _URLS, Fetched, Upstream, create_client, full_url
from tests.harness import free_port
from tests.servers import Upstream as UpstreamServer

BIG = 10 * 1024 * 1024
NO_RETRY = Retrying()
RETRY_3 = Retrying(max_retries=3, backoff_factor=0.01)


@pytest.fixture
async def fetcher() -> AsyncIterator[Upstream]:
    client = create_client()
    yield Upstream(client)
    await client.aclose()


def get(url: str) -> RenderedRequest:
    return RenderedRequest(method="GET", url=url, headers=(), params=(), content=None)


async def fetch(
    fetcher: Upstream,
    url: str,
    *,
    timeout: float = 5.0,
    retrying: Retrying = NO_RETRY,
    max_bytes: int = BIG,
) -> Fetched:
    return await fetcher.fetch(get(url), timeout=timeout, retrying=retrying, max_bytes=max_bytes)


def statuses(server: UpstreamServer, path: str, *answers: int) -> str:
    """A path answering ``answers`` in turn, then the last one forever."""
    queue = list(answers)

    async def handler(_: Request) -> Response:
        status = queue.pop(0) if len(queue) > 1 else queue[0]
        return Response(b'{"ok":true}', status, media_type="application/json")

    return server.on(path, handler)


@dataclass(frozen=True)
class CountingRetrying(Retrying):
    """A Retrying that records each wait it is asked for: one per retry."""

    waits: list[int] = field(default_factory=list)

    def backoff(self, attempt: int, rand: random.Random | None = None) -> float:
        self.waits.append(attempt)
        return super().backoff(attempt, rand)


# --- success -------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204])
async def test_every_2xx_is_success(
    fetcher: Upstream, upstream: UpstreamServer, status: int
) -> None:
    body = b"" if status == 204 else b'{"n":1}'
    url = upstream.answer("/ok", body, status)
    fetched = await fetch(fetcher, url, retrying=RETRY_3)
    assert fetched == Fetched(body, "application/json", 1, status)
    assert upstream.hits("/ok") == 1


async def test_body_and_content_type_are_kept(fetcher: Upstream, upstream: UpstreamServer) -> None:
    body = "<a>é</a>".encode("iso-8859-1")
    url = upstream.answer("/xml", body, content_type="text/xml; charset=iso-8859-1")
    fetched = await fetch(fetcher, url)
    assert fetched.content == body
    assert fetched.content_type == "text/xml; charset=iso-8859-1"


@pytest.mark.parametrize("coding", ["gzip", "deflate", "gzip, deflate"])
async def test_encoded_bodies_are_decoded(
    fetcher: Upstream, upstream: UpstreamServer, coding: str
) -> None:
    body = b'{"score": 710}' * 100
    encoded = body
    for name in coding.split(", "):
        encoded = gzip.compress(encoded) if name == "gzip" else zlib.compress(encoded)

    async def handler(_: Request) -> Response:
        return Response(encoded, headers={"Content-Encoding": coding})

    fetched = await fetch(fetcher, upstream.on("/encoded", handler))
    assert fetched.content == body


async def test_request_is_sent_as_rendered(fetcher: Upstream, upstream: UpstreamServer) -> None:
    url = upstream.answer("/echo", b"{}")
    request = RenderedRequest(
        method="POST",
        url=f"{url}?fixed=1&enc=a%2Fb",
        headers=(("X-Api-Key", "k-123"), ("Content-Type", "application/json")),
        params=(("q", "a b&c"), ("q", "é"), ("n", "2")),
        content=b'{"user": 12345}',
    )
    await fetcher.fetch(request, timeout=5, retrying=NO_RETRY, max_bytes=BIG)
    [sent] = upstream.received
    assert sent["method"] == "POST"
    assert sent["path"] == "/echo"
    # The URL's own query is kept, and the params come after it, in order.
    assert parse_qsl(sent["query"]) == [
        ("fixed", "1"),
        ("enc", "a/b"),
        ("q", "a b&c"),
        ("q", "é"),
        ("n", "2"),
    ]
    assert sent["headers"]["x-api-key"] == "k-123"
    assert sent["headers"]["content-type"] == "application/json"
    assert sent["body"] == b'{"user": 12345}'


async def test_url_query_is_sent_unchanged_without_params(
    fetcher: Upstream, upstream: UpstreamServer
) -> None:
    url = upstream.answer("/q", b"{}")
    await fetch(fetcher, f"{url}?a=1&a=2&s=x%2By%20z")
    [sent] = upstream.received
    assert sent["query"] == "a=1&a=2&s=x%2By%20z"


async def test_params_are_appended_to_the_url_query_as_it_is(
    fetcher: Upstream, upstream: UpstreamServer
) -> None:
    """Like the seed's requests: the URL's query is kept byte for byte (order, repeated
    names, valueless flags) and the params follow it, a same-named one included."""
    url = upstream.answer("/append", b"{}")
    request = RenderedRequest(
        method="GET",
        url=f"{url}?a=1&flag&b=2&a=3&t=%7E",
        headers=(),
        params=(("a", "4"), ("c", "x y")),
        content=None,
    )
    await fetcher.fetch(request, timeout=5, retrying=NO_RETRY, max_bytes=BIG)
    [sent] = upstream.received
    assert sent["query"] == "a=1&flag&b=2&a=3&t=%7E&a=4&c=x+y"


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_method_is_sent(fetcher: Upstream, upstream: UpstreamServer, method: str) -> None:
    url = upstream.answer("/m", b"{}")
    request = RenderedRequest(method=method, url=url, headers=(), params=(), content=None)
    await fetcher.fetch(request, timeout=5, retrying=NO_RETRY, max_bytes=BIG)
    assert [r["method"] for r in upstream.received] == [method]


# --- HTTP errors and retries ---------------------------------------------------------------


async def test_503_twice_then_200_succeeds_on_the_third_hit(
    fetcher: Upstream, upstream: UpstreamServer
) -> None:
    url = statuses(upstream, "/flaky", 503, 503, 200)
    fetched = await fetch(fetcher, url, retrying=RETRY_3)
    assert fetched.attempts == 3
    assert upstream.hits("/flaky") == 3


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
async def test_listed_status_is_tried_max_retries_plus_one_times(
    fetcher: Upstream, upstream: UpstreamServer, status: int
) -> None:
    url = statuses(upstream, "/down", status)
    with pytest.raises(UpstreamHTTPError) as caught:
        await fetch(fetcher, url, retrying=RETRY_3)
    assert caught.value.upstream_status == status
    assert caught.value.to_dict()["upstream_status"] == status
    assert upstream.hits("/down") == 4


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
async def test_other_4xx_are_never_retried(
    fetcher: Upstream, upstream: UpstreamServer, status: int
) -> None:
    url = statuses(upstream, "/client-error", status)
    with pytest.raises(UpstreamHTTPError) as caught:
        await fetch(fetcher, url, retrying=RETRY_3)
    assert caught.value.upstream_status == status
    assert upstream.hits("/client-error") == 1


async def test_status_outside_a_custom_forcelist_is_not_retried(
    fetcher: Upstream, upstream: UpstreamServer
) -> None:
    retrying = Retrying(max_retries=3, backoff_factor=0.01, status_forcelist=frozenset({503}))
    url = statuses(upstream, "/boom", 500)
    with pytest.raises(UpstreamHTTPError) as caught:
        await fetch(fetcher, url, retrying=retrying)
    assert caught.value.upstream_status == 500
    assert upstream.hits("/boom") == 1


async def test_no_policy_tries_once(fetcher: Upstream, upstream: UpstreamServer) -> None:
    url = statuses(upstream, "/once", 503)
    with pytest.raises(UpstreamHTTPError):
        await fetch(fetcher, url, retrying=Retrying.from_policy(None))
    assert upstream.hits("/once") == 1


async def test_redirect_is_an_answer_not_followed(
    fetcher: Upstream, upstream: UpstreamServer
) -> None:
    target = upstream.answer("/target", b"{}")

    async def redirect(_: Request) -> Response:
        return Response(b"", 302, headers={"Location": target})

    url = upstream.on("/moved", redirect)
    with pytest.raises(UpstreamHTTPError) as caught:
        await fetch(fetcher, url, retrying=RETRY_3)
    assert caught.value.upstream_status == 302
    assert upstream.hits("/target") == 0


# --- timeouts ------------------------------------------------------------------------------


def slow(server: UpstreamServer, path: str, seconds: float) -> str:
    async def handler(_: Request) -> Response:
        await asyncio.sleep(seconds)
        return Response(b"{}", media_type="application/json")

    return server.on(path, handler)


async def test_slow_upstream_times_out(fetcher: Upstream, upstream: UpstreamServer) -> None:
    url = slow(upstream, "/slow", 1.5)
    with pytest.raises(UpstreamTimeout):
        await fetch(fetcher, url, timeout=0.3)
    assert upstream.hits("/slow") == 1


async def test_timeouts_are_retried(fetcher: Upstream, upstream: UpstreamServer) -> None:
    url = slow(upstream, "/slow", 1.5)
    retrying = Retrying(max_retries=2, backoff_factor=0.01)
    with pytest.raises(UpstreamTimeout):
        await fetch(fetcher, url, timeout=0.3, retrying=retrying)
    assert upstream.hits("/slow") == 3


async def test_drip_feeding_upstream_times_out(fetcher: Upstream, upstream: UpstreamServer) -> None:
    async def drip() -> AsyncIterator[bytes]:
        for _ in range(100):  # 10 s in all, far beyond the timeout
            yield b"x"
            await asyncio.sleep(0.1)

    async def handler(_: Request) -> Response:
        return StreamingResponse(drip(), media_type="text/plain")

    url = upstream.on("/drip", handler)
    with pytest.raises(UpstreamTimeout):
        await fetch(fetcher, url, timeout=0.5)


# --- connection errors ---------------------------------------------------------------------


async def test_connection_refused(fetcher: Upstream) -> None:
    with pytest.raises(UpstreamConnectError) as caught:
        await fetch(fetcher, f"http://127.0.0.1:{free_port()}/x")
    assert caught.value.code == "CONNECTION_ERROR"


async def test_connection_refused_is_retried(fetcher: Upstream) -> None:
    retrying = CountingRetrying(max_retries=3, backoff_factor=0.01)
    with pytest.raises(UpstreamConnectError):
        await fetch(fetcher, f"http://127.0.0.1:{free_port()}/x", retrying=retrying)
    assert retrying.waits == [0, 1, 2]


@pytest.fixture
async def hangup_server() -> AsyncIterator[tuple[str, list[int]]]:
    """A TCP server that closes every connection without answering; counts them."""
    accepted: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        await reader.read(1024)
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/x", accepted
    server.close()
    await server.wait_closed()


async def test_hang_up_without_answer_is_a_connection_error_and_retried(
    fetcher: Upstream, hangup_server: tuple[str, list[int]]
) -> None:
    url, accepted = hangup_server
    with pytest.raises(UpstreamConnectError):
        await fetch(fetcher, url, retrying=Retrying(max_retries=2, backoff_factor=0.01))
    assert len(accepted) == 3


# --- size cap ------------------------------------------------------------------------------


async def test_body_at_the_cap_is_accepted(fetcher: Upstream, upstream: UpstreamServer) -> None:
    url = upstream.answer("/exact", b"x" * 1000)
    assert (await fetch(fetcher, url, max_bytes=1000)).content == b"x" * 1000


async def test_body_over_the_cap_with_content_length(
    fetcher: Upstream, upstream: UpstreamServer
) -> None:
    url = upstream.answer("/big", b"x" * 1001)
    with pytest.raises(ResponseTooLarge) as caught:
        await fetch(fetcher, url, max_bytes=1000, retrying=RETRY_3)
    assert caught.value.to_dict()["limit"] == 1000
    assert upstream.hits("/big") == 1  # not retried


async def test_declared_content_length_is_refused_before_reading(
    fetcher: Upstream, upstream: UpstreamServer
) -> None:
    """A Content-Length over the cap is refused at once, without waiting for the body."""

    async def stalled() -> AsyncIterator[bytes]:
        yield b"x" * 10
        await asyncio.sleep(1)  # reading the body would time out or fail instead

    async def handler(_: Request) -> Response:
        return StreamingResponse(stalled(), headers={"Content-Length": "50000"})

    url = upstream.on("/declared", handler)
    with pytest.raises(ResponseTooLarge):
        await fetch(fetcher, url, max_bytes=1000, timeout=0.5)


def chunked(server: UpstreamServer, path: str, chunks: int, size: int) -> str:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(chunks):
            yield b"y" * size

    async def handler(_: Request) -> Response:
        return StreamingResponse(body(), media_type="application/octet-stream")

    return server.on(path, handler)


async def test_chunked_body_over_the_cap(fetcher: Upstream, upstream: UpstreamServer) -> None:
    url = chunked(upstream, "/chunked", chunks=64, size=1024)
    with pytest.raises(ResponseTooLarge):
        await fetch(fetcher, url, max_bytes=10_000)


async def test_chunked_body_under_the_cap(fetcher: Upstream, upstream: UpstreamServer) -> None:
    url = chunked(upstream, "/chunked-small", chunks=8, size=1024)
    fetched = await fetch(fetcher, url, max_bytes=8 * 1024)
    assert fetched.content == b"y" * 8 * 1024


async def test_chunked_body_has_no_content_length(upstream: UpstreamServer) -> None:
    """Guards the test above: the chunked answer really carries no Content-Length."""
    url = chunked(upstream, "/chunked-check", chunks=4, size=10)
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
    assert "content-length" not in response.headers
    assert response.headers.get("transfer-encoding") == "chunked"


# --- Retry-After, the total deadline, methods safe to send twice --------------------------


def request(method: str, url: str) -> RenderedRequest:
    return RenderedRequest(method=method, url=url, headers=(), params=(), content=b"{}")


def then_ok(server: UpstreamServer, path: str, first: Response) -> str:
    answers = [first]

    async def handler(_: Request) -> Response:
        return answers.pop() if answers else Response(b"{}", 200)

    return server.on(path, handler)


async def test_retry_after_is_honoured(fetcher: Upstream, upstream: UpstreamServer) -> None:
    url = then_ok(upstream, "/later", Response(b"busy", 503, headers={"Retry-After": "1"}))
    started = time.monotonic()
    fetched = await fetcher.fetch(
        request("GET", url),
        timeout=5,
        retrying=Retrying(max_retries=1, backoff_factor=0.01),
        max_bytes=100,
    )
    assert fetched.attempts == 2 and upstream.hits("/later") == 2
    assert time.monotonic() - started >= 1.0  # it waited as asked, not its 10 ms backoff


async def test_retry_after_past_the_deadline_ends_the_retries(
    fetcher: Upstream, upstream: UpstreamServer
) -> None:
    url = then_ok(upstream, "/much-later", Response(b"busy", 503, headers={"Retry-After": "3600"}))
    with pytest.raises(UpstreamHTTPError) as caught:
        await fetcher.fetch(
            request("GET", url),
            timeout=1,
            retrying=Retrying(max_retries=3, backoff_factor=0.01),
            max_bytes=100,
        )
    assert caught.value.upstream_status == 503
    assert upstream.hits("/much-later") == 1


async def test_post_is_not_resent_after_the_upstream_saw_it(
    fetcher: Upstream, upstream: UpstreamServer
) -> None:
    url = then_ok(upstream, "/charge", Response(b"busy", 503))
    retrying = Retrying(max_retries=3, backoff_factor=0.01, method="POST")
    with pytest.raises(UpstreamHTTPError):
        await fetcher.fetch(request("POST", url), timeout=5, retrying=retrying, max_bytes=100)
    assert upstream.hits("/charge") == 1


async def test_post_is_resent_when_the_source_allows_it(
    fetcher: Upstream, upstream: UpstreamServer
) -> None:
    url = then_ok(upstream, "/idempotent-post", Response(b"busy", 503))
    retrying = Retrying(max_retries=3, backoff_factor=0.01, method="POST", non_idempotent=True)
    fetched = await fetcher.fetch(request("POST", url), timeout=5, retrying=retrying, max_bytes=100)
    assert fetched.attempts == 2 and upstream.hits("/idempotent-post") == 2


async def test_post_is_not_resent_after_a_hang_up(
    fetcher: Upstream,
    hangup_server: tuple[str, list[int]],
) -> None:
    url, accepted = hangup_server
    retrying = Retrying(max_retries=3, backoff_factor=0.01, method="POST")
    with pytest.raises(UpstreamConnectError):
        await fetcher.fetch(request("POST", url), timeout=5, retrying=retrying, max_bytes=100)
    assert len(accepted) == 1  # the request went out on that connection: not sent again


async def test_post_is_retried_when_no_connection_was_made(fetcher: Upstream) -> None:
    calls: list[int] = []

    class Counting(Retrying):
        def backoff(self, attempt: int, rand: object = None) -> float:
            calls.append(attempt)
            return 0.0

    retrying = Counting(max_retries=2, method="POST")
    with pytest.raises(UpstreamConnectError):
        await fetcher.fetch(
            request("POST", f"http://127.0.0.1:{free_port()}/x"),
            timeout=5,
            retrying=retrying,
            max_bytes=100,
        )
    assert calls == [0, 1]


async def test_cookies_set_by_an_upstream_are_never_sent_back(
    fetcher: Upstream, upstream: UpstreamServer
) -> None:
    async def sets_cookie(_: Request) -> Response:
        response = Response(b"{}")
        response.set_cookie("session", "tenant-a-session")
        return response

    url = upstream.on("/cookie", sets_cookie)
    for _ in range(2):
        await fetch(fetcher, url)
    assert [r["headers"].get("cookie") for r in upstream.received] == [None, None]


# --- the request as httpx would build it ---------------------------------------------------

URLS = [
    "http://127.0.0.1:8000/users/u-1",
    "https://API.Example.com:443/v1/x?key=k%2Fv&flag&a=1&a=2",
    "http://h.example/p?",
    "http://h.example/a/./b/../c",  # dot segments: httpx removes them
    "http://h.example/a b?q=x y",  # unescaped: httpx escapes them
    "http://h.example/%zz/%41",  # a malformed escape beside a valid one
    "http://user:secret@h.example/x",
    "http://h.example?x=1",  # no path
    "http://h.example/x#frag",
    "http://[::1]:8080/x",
    "http://h.example/é?q=é",
    "http://h.example/{a}/`b`|c",
    "http://h.example:80/x",
    "http://xn--bcher-kva.example/x",
    "HTTP://H.EXAMPLE/X",
]


@pytest.mark.parametrize("text", URLS)
def test_urls_are_parsed_as_httpx_parses_them(text: str) -> None:
    """Whether the origin's parse is reused or not, the URL is httpx's own, part for part."""
    for _ in range(2):  # the second time, the origin comes from the cache
        ours, theirs = _URLS.parse(text), httpx.URL(text)
        assert (ours.scheme, ours.userinfo, ours.host, ours.port) == (
            theirs.scheme,
            theirs.userinfo,
            theirs.host,
            theirs.port,
        )
        assert (ours.raw_path, ours.fragment, str(ours)) == (
            theirs.raw_path,
            theirs.fragment,
            str(theirs),
        )


@pytest.mark.parametrize(
    "text", ["http://h.example:port/x", "http://999.1.1.1/x", "http://[::g]/x", "http://h/\t"]
)
def test_invalid_urls_are_refused_as_httpx_refuses_them(text: str) -> None:
    with pytest.raises(httpx.InvalidURL):
        httpx.URL(text)
    with pytest.raises(httpx.InvalidURL):
        _URLS.parse(text)


@pytest.mark.parametrize(
    "rendered",
    [
        RenderedRequest("GET", "http://h.example/u/1", (), (), None),
        RenderedRequest(
            "POST",
            "http://h.example/u/1?a=1",
            (("X-Api-Key", "k"), ("Content-Type", "application/json")),
            (("q", "a b&c"), ("q", "é")),
            b'{"a": 1}',
        ),
        RenderedRequest("POST", "http://h.example/u", (), (), None),
        RenderedRequest("patch", "http://h.example/u", (), (), b""),
        RenderedRequest(
            "PUT",
            "http://h.example:8080/u",
            (("host", "other"), ("accept-encoding", "identity"), ("Content-Length", "3")),
            (),
            b"abc",
        ),
        RenderedRequest("GET", "http://h.example/u", (("Accept", "a"), ("accept", "b")), (), None),
        RenderedRequest(
            "PATCH", "http://h.example/u", (("Transfer-Encoding", "chunked"),), (), None
        ),
        RenderedRequest("GET", "http://u:p@h.example/a b", (("X-Value", "v"),), (), None),
    ],
)
async def test_requests_are_built_as_the_client_builds_them(rendered: RenderedRequest) -> None:
    async with create_client() as client:
        ours = Upstream(client).build(rendered, 7.5)
        theirs = client.build_request(
            rendered.method,
            full_url(rendered),
            headers=list(rendered.headers),
            content=rendered.content,
            timeout=7.5,
        )
    assert (ours.method, ours.url, ours.headers.raw) == (
        theirs.method,
        theirs.url,
        theirs.headers.raw,
    )
    assert ours.extensions["timeout"] == theirs.extensions["timeout"]
    assert set(ours.extensions) == {"timeout", DEADLINE}
    assert b"".join(cast(Iterable[bytes], ours.stream)) == b"".join(
        cast(Iterable[bytes], theirs.stream)
    )
