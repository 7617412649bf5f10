"""A source's upstream calls, authenticated as its ``source.auth`` says (``proxy.auth``).

``basic``: the header is built from the stored credentials, per call. ``bearer``: an
OAuth2 token, cached in Redis at ``{prefix}token:{sid}`` (Fernet-encrypted, like every
secret at rest) until ``auth.cache_seconds(expires_in)``, and requested once at a time
across sidecars: in a process, callers needing a token share one request; across
processes, the requester holds ``{prefix}lock:{sid}:token`` (``SET NX PX``, expiring
after the request's timeout so a crashed holder blocks nobody) and the others poll the
token key until it appears. A holder whose request failed leaves its ``AuthError`` on
the lock for ``FAILURE_HOLD_MS``: the sidecars that waited for it answer it too,
instead of each calling a failing endpoint in turn. With Redis unreachable each
process still requests at most one token at a time, and keeps none.

An upstream 401 to a bearer call means the token was revoked or expired early: the
token is replaced (unless another caller already did) and the call made once more.

The token request goes through the shared upstream client, so the egress policy
decides where it may go (``EgressDenied`` passes through). Tokens and credentials
appear in no answer, log line or error message: errors name what failed, never a value.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Hashable
from typing import TypeVar

import httpx

from proxy.auth import (
    basic_header,
    cache_seconds,
    parse_token,
    token_form,
    with_authorization,
)
from proxy.cache import CacheUnavailable, RedisClient, call, reply_bytes
from proxy.errors import AuthError, InternalError, UpstreamHTTPError
from proxy.keys import KeyLayout
from proxy.metrics import TOKEN_REQUESTS
from proxy.secrets import SecretBox, SecretKeyError

# The fetch lock's pattern and timings: a failed request is answered for FAILURE_HOLD_MS
# (2 s) to those who waited for it or came right after, so a failing endpoint sees one
# request every 2 s, not one per waiting call or sidecar; a lock outlives its holder's
# timeout by SLACK at most.
from proxy.singleflight import (
    FAILED_MARK,
    FAILURE_HOLD_MS,
    MARK_FAILED,
    POLL_MAX,
    POLL_START,
    RELEASE,
    SLACK,
)
from proxy.source_registry import Source
from proxy.templates import RenderedRequest

T = TypeVar("T")

logger = logging.getLogger("databroker.tokens")

MAX_TOKEN_BYTES = 64 * 1024
"""The largest token endpoint answer read; a larger one is refused (AUTH_ERROR)."""


class Tokens:
    """Authenticates a source's calls; owns the ``token:`` family and its locks."""

    def __init__(
        self, redis: RedisClient, layout: KeyLayout, box: SecretBox, client: httpx.AsyncClient
    ) -> None:
        self._redis = redis
        self._layout = layout
        self._box = box
        self._client = client
        self._inflight: dict[Hashable, asyncio.Future[str]] = {}

    async def send(
        self,
        source: Source,
        request: RenderedRequest,
        timeout: float,
        call_upstream: Callable[[RenderedRequest], Awaitable[T]],
        applied: list[str] | None = None,
    ) -> T:
        """``call_upstream(request)`` authenticated; a bearer call answered 401 is made
        once more with a new token (its second 401 is the answer). ``applied`` collects
        each credential sent (a basic pair's base64, a token): what an answer that
        echoes the upstream (``POST …/test``) must mask."""
        auth = source.http.auth
        if auth is None:
            return await call_upstream(request)

        def authorized(scheme: str, credential: str) -> RenderedRequest:
            if applied is not None:
                applied.append(credential)
            return with_authorization(request, f"{scheme} {credential}")

        if auth.method == "basic":
            basic = basic_header(source.credentials).removeprefix("Basic ")
            return await call_upstream(authorized("Basic", basic))
        token = await self.token(source, timeout)
        try:
            return await call_upstream(authorized("Bearer", token))
        except UpstreamHTTPError as exc:
            if exc.upstream_status != 401:
                raise
        token = await self.token(source, timeout, rejected=token)
        return await call_upstream(authorized("Bearer", token))

    async def token(self, source: Source, timeout: float, rejected: str | None = None) -> str:
        """The source's token: cached, or requested (once across sidecars). ``rejected``:
        a token the upstream refused, which is not answered again."""
        with contextlib.suppress(CacheUnavailable):
            cached = await self._cached(source.data_source_id)
            if cached is not None and cached != rejected:
                return cached
        name = (source.data_source_id, rejected)
        leader = self._inflight.get(name)
        if leader is not None:
            # shield: a caller that gives up must not cancel the request the others wait for.
            return await asyncio.shield(leader)
        future = asyncio.get_running_loop().create_future()
        self._inflight[name] = future
        try:
            token = await self._across(source, timeout, rejected)
            future.set_result(token)
            return token
        except BaseException as exc:
            relayed = exc if isinstance(exc, Exception) else InternalError("cancelled")
            future.set_exception(relayed)
            future.exception()  # retrieved: a leader without followers is not an error
            raise
        finally:
            del self._inflight[name]

    async def forget(self, data_source_id: uuid.UUID) -> None:
        """Drop the cached token (its credentials changed); never raises: it expires anyway."""
        with contextlib.suppress(CacheUnavailable):
            await call(self._redis.delete(self._layout.token(data_source_id)))

    async def _cached(self, data_source_id: uuid.UUID) -> str | None:
        raw = await call(self._redis.get(self._layout.token(data_source_id)))
        if raw is None:
            return None
        try:
            token: str = self._box.decrypt(reply_bytes(raw).decode())
        except SecretKeyError:
            return None  # stored under a key this sidecar lacks (rotation): request anew
        return token

    async def _across(self, source: Source, timeout: float, rejected: str | None) -> str:
        """Request the token holding the Redis lock, or wait for the sidecar that does."""
        sid = source.data_source_id
        lock = self._layout.token_lock(sid)
        mine = uuid.uuid4().hex
        give_up = time.monotonic() + timeout + SLACK
        delay = POLL_START
        try:
            while True:
                cached = await self._cached(sid)
                if cached is not None and cached != rejected:
                    return cached
                taken = await call(
                    self._redis.set(lock, mine, nx=True, px=int((timeout + SLACK) * 1000))
                )
                if taken:
                    return await self._request_holding(source, timeout, lock, mine, rejected)
                held = await call(self._redis.get(lock))
                if held is not None and reply_bytes(held).startswith(FAILED_MARK):
                    raise AuthError(reply_bytes(held)[1:].decode())
                if time.monotonic() + delay > give_up:
                    raise AuthError("timed out waiting for another sidecar's token request")
                await asyncio.sleep(delay)
                delay = min(delay * 2, POLL_MAX)
        except CacheUnavailable:
            # Redis is away: request without the lock, keep nothing.
            token, _ = await self._request(source, timeout)
            return token

    async def _request_holding(
        self, source: Source, timeout: float, lock: str, mine: str, rejected: str | None
    ) -> str:
        sid = source.data_source_id
        try:
            # Race window: the previous holder may have stored a token and released
            # between our read and our lock. One more GET costs less than a request.
            cached = await self._cached(sid)
            if cached is not None and cached != rejected:
                token, keep_ms = cached, 0
            else:
                token, expires_in = await self._request(source, timeout)
                keep_ms = int(cache_seconds(expires_in) * 1000)
        except AuthError as exc:
            # The message names what failed (a status, a timeout), never a value.
            logger.warning("token request for %r failed: %s", source.name, exc.message)
            mark = FAILED_MARK + exc.message.encode()
            with contextlib.suppress(CacheUnavailable):
                await call(self._redis.eval(MARK_FAILED, 1, lock, mine, mark, FAILURE_HOLD_MS))
            raise
        except BaseException:
            with contextlib.suppress(CacheUnavailable):
                await call(self._redis.eval(RELEASE, 1, lock, mine))
            raise
        with contextlib.suppress(CacheUnavailable):
            if keep_ms > 0:
                await call(
                    self._redis.set(self._layout.token(sid), self._box.encrypt(token), px=keep_ms)
                )
            await call(self._redis.eval(RELEASE, 1, lock, mine))
        return token

    async def _request(self, source: Source, timeout: float) -> tuple[str, float]:
        """One token request to ``auth.token_url``: ``(token, expires_in)``, or AuthError."""
        auth = source.http.auth
        assert auth is not None and auth.token_url is not None
        form = token_form(auth, source.credentials)
        try:
            answer = await self._post(auth.token_url, form, timeout)
        except AuthError:
            TOKEN_REQUESTS.labels(source.name, "AUTH_ERROR").inc()
            raise
        TOKEN_REQUESTS.labels(source.name, "OK").inc()
        return answer

    async def _post(
        self, token_url: str, form: list[tuple[str, str]], timeout: float
    ) -> tuple[str, float]:
        """POST the form; AuthError naming what failed, never what the endpoint sent."""
        try:
            async with asyncio.timeout(timeout):
                request = self._client.build_request(
                    "POST",
                    token_url,
                    data=dict(form),
                    headers={"Accept": "application/json", "Accept-Encoding": "identity"},
                    timeout=timeout,
                )
                response = await self._client.send(request, stream=True)
                try:
                    if not 200 <= response.status_code < 300:
                        raise AuthError(
                            f"the token endpoint answered HTTP {response.status_code}",
                            upstream_status=response.status_code,
                        )
                    body = b""
                    async for chunk in response.aiter_raw():
                        body += chunk
                        if len(body) > MAX_TOKEN_BYTES:
                            raise AuthError(
                                f"the token endpoint's answer exceeds {MAX_TOKEN_BYTES} bytes"
                            )
                finally:
                    await response.aclose()
        except (TimeoutError, httpx.TimeoutException):
            raise AuthError(f"the token endpoint did not answer within {timeout:g}s") from None
        except httpx.TransportError as exc:
            raise AuthError(
                f"the token endpoint could not be reached: {type(exc).__name__}"
            ) from None
        except httpx.InvalidURL:
            raise AuthError("the source's auth.token_url is not a valid URL") from None
        return parse_token(body)
