"""The worker's client for its databroker sidecar. Imports httpx and the standard library
only: a worker can install it without the server's dependencies, or copy this one file.

    from proxy.client import Client, RateLimited

    with Client(uds="/run/databroker/databroker.sock") as broker:
        answer = broker.request("credit_bureau", {"ssn": ssn}, run_id)
        answer.value, answer.origin, answer.data_object_id

``Client`` and ``AsyncClient`` keep one connection pool each (make one per process and
reuse it), send ``POST /internal/data-broker`` and answer an ``Answer`` or raise one
class per error code, all under ``BrokerError``:

    BrokerError ................... any failure; an unknown code arrives as this class
    ├── BrokerUnavailable ......... the sidecar could not be reached, or did not answer in time
    ├── InvalidRequest ............ 400 INVALID_REQUEST
    ├── MissingVariables .......... 400 MISSING_VARIABLES   (.details["variables"]: names)
    ├── MissingParams ............. 400 MISSING_PARAMS      (.details["params"])
    ├── UnknownParams ............. 400 UNKNOWN_PARAMS      (.details["params"])
    ├── InvalidParam .............. 400 INVALID_PARAM       (.details["param"])
    ├── EgressDenied .............. 403 EGRESS_DENIED
    ├── DataSourceNotFound ........ 404 DATA_SOURCE_NOT_FOUND
    ├── ReplayMiss ................ 404 REPLAY_MISS
    ├── BudgetExhausted ........... 429 BUDGET_EXHAUSTED    (not retried)
    ├── RateLimited ............... 429 RATE_LIMITED
    ├── ParseError ................ 500 PARSE_ERROR
    ├── InternalError ............. 500 INTERNAL
    ├── UpstreamError ............. 502, the data source failed
    │   ├── UpstreamTimeout ....... TIMEOUT
    │   ├── UpstreamConnectError .. CONNECTION_ERROR
    │   ├── UpstreamHTTPError ..... HTTP_ERROR          (.upstream_status)
    │   ├── ResponseTooLarge ...... RESPONSE_TOO_LARGE
    │   └── AuthError ............. AUTH_ERROR
    ├── CircuitOpen ............... 503 CIRCUIT_OPEN
    ├── SourcePaused .............. 503 SOURCE_PAUSED
    └── AuditBacklogFull .......... 503 AUDIT_BACKLOG_FULL

Retried, within ``Retries`` (attempts and total time both bounded): 503 and 429 answers,
waiting what ``Retry-After`` asks, else an exponential backoff with jitter — they mean
"not now" (a breaker open, a paused source, a rate limit, a full outbox) — except
``BUDGET_EXHAUSTED``, which lasts until the budget's period ends; and a connection that
could not be made, when nothing was sent. Nothing else: any other error answers the
same way again, and a request cut after it was sent may already have cost a paid call.
"""

from __future__ import annotations

import abc
import asyncio
import json
import random
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar

import httpx

__all__ = [
    "ERRORS",
    "Answer",
    "AsyncClient",
    "AuditBacklogFull",
    "AuthError",
    "BrokerError",
    "BrokerUnavailable",
    "BudgetExhausted",
    "CircuitOpen",
    "Client",
    "DataSourceNotFound",
    "EgressDenied",
    "InternalError",
    "InvalidParam",
    "InvalidRequest",
    "MissingParams",
    "MissingVariables",
    "ParseError",
    "RateLimited",
    "ReplayMiss",
    "ResponseTooLarge",
    "Retries",
    "SourcePaused",
    "UnknownParams",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamHTTPError",
    "UpstreamTimeout",
    "parse_retry_after",
]

PATH = "/internal/data-broker"
_HTTP = TypeVar("_HTTP", httpx.Client, httpx.AsyncClient)
# The broker's longest answer is a source's deadline (timeout x attempts + backoffs):
# reads wait long; a connection on the same host is made at once or not at all.
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=1.0)
# uvicorn closes a connection idle for 5 s: reusing one at that instant would fail a
# request that was sent, which is not retried. Kept idle 4 s at most here.
DEFAULT_LIMITS = httpx.Limits(
    max_connections=100, max_keepalive_connections=20, keepalive_expiry=4.0
)
HEADERS = {"content-type": "application/json"}
RETRIED_STATUSES = frozenset({429, 503})
NEVER_RETRIED = frozenset({"BUDGET_EXHAUSTED"})


@dataclass(frozen=True, slots=True)
class Answer:
    """A successful broker answer."""

    data_object_id: str
    origin: Literal["REQUEST", "CACHE"]
    key: str
    value: Any
    start_time: float | None
    end_time: float | None
    stale: bool = False
    """A cached value served past its TTL because the upstream failed (``stale_if_error``)."""
    replay: Mapping[str, Any] | None = None
    """For a replayed request: ``{"data_object_created_at": …}``."""


# --- errors --------------------------------------------------------------------------------


class BrokerError(Exception):
    """Any failure. ``code`` is the broker's error code (None when it sent none),
    ``status`` the HTTP status, ``details`` the error's other fields."""

    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        details: Mapping[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.status = status
        self.details: Mapping[str, Any] = details or {}
        self.retry_after = retry_after
        """Seconds the broker's ``Retry-After`` asked for, if it sent one."""

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed if sent again a little later."""
        return self.status in RETRIED_STATUSES and self.code not in NEVER_RETRIED

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.code else self.message


class BrokerUnavailable(BrokerError):
    """No answer from the sidecar: not listening, or too slow for the client's timeout."""

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent
        """Whether the request may have reached the broker (then it is not sent again)."""

    @property
    def retryable(self) -> bool:
        return not self.sent


class InvalidRequest(BrokerError):
    code = "INVALID_REQUEST"


class MissingVariables(BrokerError):
    code = "MISSING_VARIABLES"


class MissingParams(BrokerError):
    code = "MISSING_PARAMS"


class UnknownParams(BrokerError):
    code = "UNKNOWN_PARAMS"


class InvalidParam(BrokerError):
    code = "INVALID_PARAM"


class EgressDenied(BrokerError):
    code = "EGRESS_DENIED"


class DataSourceNotFound(BrokerError):
    code = "DATA_SOURCE_NOT_FOUND"


class ReplayMiss(BrokerError):
    code = "REPLAY_MISS"


class BudgetExhausted(BrokerError):
    code = "BUDGET_EXHAUSTED"


class RateLimited(BrokerError):
    code = "RATE_LIMITED"


class ParseError(BrokerError):
    code = "PARSE_ERROR"


class InternalError(BrokerError):
    code = "INTERNAL"


class UpstreamError(BrokerError):
    """The data source failed (502)."""


class UpstreamTimeout(UpstreamError):
    code = "TIMEOUT"


class UpstreamConnectError(UpstreamError):
    code = "CONNECTION_ERROR"


class UpstreamHTTPError(UpstreamError):
    code = "HTTP_ERROR"

    @property
    def upstream_status(self) -> int | None:
        status = self.details.get("upstream_status")
        return status if isinstance(status, int) else None


class ResponseTooLarge(UpstreamError):
    code = "RESPONSE_TOO_LARGE"


class AuthError(UpstreamError):
    code = "AUTH_ERROR"


class CircuitOpen(BrokerError):
    code = "CIRCUIT_OPEN"


class SourcePaused(BrokerError):
    code = "SOURCE_PAUSED"


class AuditBacklogFull(BrokerError):
    code = "AUDIT_BACKLOG_FULL"


def _subclasses(cls: type[BrokerError]) -> list[type[BrokerError]]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


ERRORS: Mapping[str, type[BrokerError]] = {
    cls.code: cls for cls in _subclasses(BrokerError) if "code" in vars(cls) and cls.code
}
"""Error code → exception class."""


# --- retries (pure) ------------------------------------------------------------------------


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date), or None."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT; one without a zone is malformed
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


@dataclass(frozen=True)
class Retries:
    """How long a request may keep trying: ``attempts`` sends in all, none started
    more than ``total`` seconds after the first; waits of ``backoff`` doubling up to
    ``max_backoff`` (half of each random), or what ``Retry-After`` asks plus up to 10%
    (hundreds of workers told the same second do not all come back in it)."""

    attempts: int = 4
    total: float = 10.0
    backoff: float = 0.1
    max_backoff: float = 2.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def wait(self, error: BrokerError, attempt: int, elapsed: float) -> float | None:
        """Seconds before sending again after ``error`` ended attempt ``attempt`` (0 for
        the first), ``elapsed`` seconds after the first send; None: give up."""
        if not error.retryable or attempt + 1 >= self.attempts:
            return None
        if error.retry_after is not None:
            delay = error.retry_after * (1 + self.rng.random() / 10)
        else:
            ceiling = min(self.backoff * 2**attempt, self.max_backoff)
            delay = ceiling / 2 + self.rng.random() * ceiling / 2
        return delay if elapsed + delay <= self.total else None


class _Attempts:
    """One request's attempts: what to wait after each failure, or the failure to raise."""

    def __init__(self, retries: Retries) -> None:
        self.retries = retries
        self.started = time.monotonic()
        self.attempt = 0

    def wait_after(self, error: BrokerError) -> float:
        delay = self.retries.wait(error, self.attempt, time.monotonic() - self.started)
        if delay is None:
            raise error
        self.attempt += 1
        return delay


# --- the wire (pure) -----------------------------------------------------------------------


def _body(
    data_source_name: str,
    configured_params: Mapping[str, Any],
    run_id: uuid.UUID | str,
    extensions: Mapping[str, Any],
) -> bytes:
    body = {
        "data_source_name": data_source_name,
        "configured_params": dict(configured_params),
        "run_id": str(run_id),
        **extensions,
    }
    # NaN and Infinity are not JSON: the broker refuses them, so they fail here first.
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def _outcome(response: httpx.Response) -> Answer | BrokerError:
    """The answer, or the error to raise (or retry), from the broker's response."""
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(body, dict) and error is None and response.status_code == 200:
        try:
            return Answer(
                data_object_id=body["data_object_id"],
                origin=body["origin"],
                key=body["key"],
                value=body["value"],
                start_time=body["start_time"],
                end_time=body["end_time"],
                stale=bool(body.get("stale", False)),
                replay=body.get("replay"),
            )
        except KeyError:
            pass
    if not isinstance(error, dict):
        # Not the broker's shape: a proxy's page, uvicorn's own 503, another service.
        return BrokerError(
            f"not a broker answer: HTTP {response.status_code}",
            status=response.status_code,
            retry_after=retry_after,
        )
    code = str(error.get("code"))
    details = {k: v for k, v in error.items() if k not in ("code", "message")}
    return ERRORS.get(code, BrokerError)(
        str(error.get("message", "")),
        code=code,
        status=response.status_code,
        details=details,
        retry_after=retry_after,
    )


def _unavailable(exc: httpx.TransportError) -> BrokerUnavailable:
    # A connection never made sent nothing; anything later may have reached the broker.
    sent = not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
    error = BrokerUnavailable(f"databroker unavailable: {type(exc).__name__}: {exc}", sent=sent)
    error.__cause__ = exc
    return error


# --- clients -------------------------------------------------------------------------------


class _Client(abc.ABC, Generic[_HTTP]):
    """What both clients share: the address, the timeouts and pool, the retries."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        uds: str | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        retries: Retries | None = None,
        limits: httpx.Limits = DEFAULT_LIMITS,
    ) -> None:
        if (base_url is None) == (uds is None):
            raise ValueError(
                "give base_url= (http://127.0.0.1:8787) or uds= (a socket path), not both"
            )
        self.retries = retries or Retries()
        self._http: _HTTP = self._open(base_url or "http://databroker", uds, timeout, limits)

    @abc.abstractmethod
    def _open(
        self, base_url: str, uds: str | None, timeout: httpx.Timeout, limits: httpx.Limits
    ) -> _HTTP:
        """The httpx client: one connection pool, reused by every request."""


class Client(_Client[httpx.Client]):
    """A synchronous client. ``Client(base_url="http://127.0.0.1:8787")`` or
    ``Client(uds="/run/databroker/databroker.sock")``; close it, or use it in ``with``."""

    def _open(
        self, base_url: str, uds: str | None, timeout: httpx.Timeout, limits: httpx.Limits
    ) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=uds, limits=limits)
        return httpx.Client(
            base_url=base_url, transport=transport, timeout=timeout, headers=HEADERS
        )

    def request(
        self,
        data_source_name: str,
        configured_params: Mapping[str, Any],
        run_id: uuid.UUID | str,
        **extensions: Any,
    ) -> Answer:
        """Ask the broker for a data source's answer; ``extensions`` are the request's
        other fields (``project_id``, ``max_age``, ``replay``)."""
        body = _body(data_source_name, configured_params, run_id, extensions)
        attempts = _Attempts(self.retries)
        while True:
            outcome = self._send(body)
            if isinstance(outcome, Answer):
                return outcome
            time.sleep(attempts.wait_after(outcome))

    def _send(self, body: bytes) -> Answer | BrokerError:
        try:
            return _outcome(self._http.post(PATH, content=body))
        except httpx.TransportError as exc:
            return _unavailable(exc)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClient(_Client[httpx.AsyncClient]):
    """``Client`` for asyncio: ``async with AsyncClient(uds=…) as broker: await broker.request(…)``."""

    def _open(
        self, base_url: str, uds: str | None, timeout: httpx.Timeout, limits: httpx.Limits
    ) -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(uds=uds, limits=limits)
        return httpx.AsyncClient(
            base_url=base_url, transport=transport, timeout=timeout, headers=HEADERS
        )

    async def request(
        self,
        data_source_name: str,
        configured_params: Mapping[str, Any],
        run_id: uuid.UUID | str,
        **extensions: Any,
    ) -> Answer:
        """As ``Client.request``."""
        body = _body(data_source_name, configured_params, run_id, extensions)
        attempts = _Attempts(self.retries)
        while True:
            outcome = await self._send(body)
            if isinstance(outcome, Answer):
                return outcome
            await asyncio.sleep(attempts.wait_after(outcome))

    async def _send(self, body: bytes) -> Answer | BrokerError:
        try:
            return _outcome(await self._http.post(PATH, content=body))
        except httpx.TransportError as exc:
            return _unavailable(exc)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
