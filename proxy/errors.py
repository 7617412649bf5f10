"""The broker's error tree: one stable ``code`` and one HTTP status per failure.

    BrokerError
    ├── InvalidRequest ............ 400 INVALID_REQUEST
    ├── DataSourceNotFound ........ 404 DATA_SOURCE_NOT_FOUND
    ├── ReplayMiss ................ 404 REPLAY_MISS        (a strict replay found no DataObject)
    ├── MissingVariables .......... 400 MISSING_VARIABLES  (names only, never values)
    ├── MissingParams ............. 400 MISSING_PARAMS
    ├── UnknownParams ............. 400 UNKNOWN_PARAMS
    ├── InvalidParam .............. 400 INVALID_PARAM      (names the parameter, never its value)
    ├── UpstreamError ............. 502
    │   ├── UpstreamTimeout ....... 502 TIMEOUT
    │   ├── UpstreamConnectError .. 502 CONNECTION_ERROR
    │   ├── UpstreamHTTPError ..... 502 HTTP_ERROR         (+ upstream_status)
    │   ├── ResponseTooLarge ...... 502 RESPONSE_TOO_LARGE
    │   ├── EgressDenied .......... 403 EGRESS_DENIED      (names the host, checked before connecting)
    │   └── AuthError ............. 502 AUTH_ERROR         (the token endpoint failed or refused)
    ├── RelayedError .............. another fetch's failure, shared with its waiters
    ├── AuditBacklogFull .......... 503 AUDIT_BACKLOG_FULL
    ├── VendorRefusal ............. not called: the source's protection said "not now" (Retry-After)
    │   ├── BudgetExhausted ....... 429 BUDGET_EXHAUSTED   (names the budget and its period)
    │   ├── RateLimited ........... 429 RATE_LIMITED
    │   ├── CircuitOpen ........... 503 CIRCUIT_OPEN
    │   └── SourcePaused .......... 503 SOURCE_PAUSED
    ├── ParseError ................ 500 PARSE_ERROR
    ├── InternalError ............. 500 INTERNAL
    └── AdminError ................ admin routes only
        ├── Unauthorized .......... 401 UNAUTHORIZED
        ├── AdminDisabled ......... 403 ADMIN_DISABLED
        ├── NotFound .............. 404 NOT_FOUND
        ├── Conflict .............. 400 CONFLICT           (a name taken, an archived source)
        ├── Refused ............... 400 REFUSED            (well-formed, but not allowed)
        ├── ValidationFailed ...... 422 VALIDATION_ERROR   (``detail``: FastAPI's list)
        ├── BodyTooLarge .......... 413 BODY_TOO_LARGE
        ├── DatabaseUnavailable ... 503 DATABASE_UNAVAILABLE
        └── RedisUnavailable ...... 503 REDIS_UNAVAILABLE  (an erasure cannot reach the cache)

    StartupError .................. the process cannot start: one line, exit non-zero

Lower-level exceptions (httpx, redis, SQLAlchemy) are translated where they
enter, with ``raise … from exc``. Messages are written for the caller and must
never carry a secret: callers build them from names, never from values.
"""

from __future__ import annotations

import math
from typing import Any


class BrokerError(Exception):
    code: str = "INTERNAL"
    status: int = 500
    retry_after: float | None = None
    """Seconds the caller should wait before asking again: sent as ``Retry-After``."""

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    def to_dict(self) -> dict[str, Any]:
        """The ``error`` object of a response and of an audit row."""
        return {"code": self.code, "message": self.message, **self.extra}


class InvalidRequest(BrokerError):
    code = "INVALID_REQUEST"
    status = 400


class DataSourceNotFound(BrokerError):
    code = "DATA_SOURCE_NOT_FOUND"
    status = 404


class ReplayMiss(BrokerError):
    """A strict replay found no stored DataObject: nothing was called."""

    code = "REPLAY_MISS"
    status = 404


class MissingVariables(BrokerError):
    code = "MISSING_VARIABLES"
    status = 400

    def __init__(self, names: list[str]) -> None:
        super().__init__(f"variables without a value: {', '.join(names)}", variables=names)


class MissingParams(BrokerError):
    code = "MISSING_PARAMS"
    status = 400

    def __init__(self, names: list[str]) -> None:
        super().__init__(f"configured_params lacks: {', '.join(names)}", params=names)


def shortlist(names: list[str], count: int = 20, width: int = 100) -> list[str]:
    """The first names, each cut short: names from a caller must not make an answer (or
    its audit row) as large as the request; 60k keys or one 900 KB key are a short list."""
    return [n if len(n) <= width else n[:width] + "…" for n in names[:count]]


class UnknownParams(BrokerError):
    code = "UNKNOWN_PARAMS"
    status = 400

    def __init__(self, names: list[str]) -> None:
        listed = shortlist(names)
        more = f" and {len(names) - len(listed)} more" if len(names) > len(listed) else ""
        super().__init__(
            f"configured_params has undeclared: {', '.join(listed)}{more}", params=listed
        )


class InvalidParam(BrokerError):
    code = "INVALID_PARAM"
    status = 400

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"parameter {name!r} {reason}", param=name)


class UpstreamError(BrokerError):
    status = 502


class UpstreamTimeout(UpstreamError):
    code = "TIMEOUT"


class UpstreamConnectError(UpstreamError):
    code = "CONNECTION_ERROR"


class UpstreamHTTPError(UpstreamError):
    code = "HTTP_ERROR"

    def __init__(self, upstream_status: int, retry_after: float | None = None) -> None:
        """``retry_after``: what an upstream 429 asked for (``proxy.vendor_guard.hold_of``)."""
        extra = {} if retry_after is None else {"retry_after": _whole_seconds(retry_after)}
        super().__init__(
            f"upstream answered HTTP {upstream_status}", upstream_status=upstream_status, **extra
        )
        self.upstream_status = upstream_status
        self.retry_after = retry_after


class ResponseTooLarge(UpstreamError):
    code = "RESPONSE_TOO_LARGE"

    def __init__(self, limit: int) -> None:
        super().__init__(f"upstream body exceeds {limit} bytes", limit=limit)


class EgressDenied(UpstreamError):
    """The egress policy refuses the destination: nothing was sent, so nothing is retried."""

    code = "EGRESS_DENIED"
    status = 403

    def __init__(self, host: str, reason: str) -> None:
        # The host stays out of the message: a variable may have put it in the URL.
        super().__init__(f"egress refused: {reason}")
        self.host = host


class AuthError(UpstreamError):
    """The source's OAuth2 token endpoint failed or refused: no token, so no upstream call."""

    code = "AUTH_ERROR"


class RelayedError(BrokerError):
    """The failure of a fetch another sidecar made for the same key, as it reported it."""

    def __init__(self, error: dict[str, Any]) -> None:
        fields = {k: v for k, v in error.items() if k not in ("code", "message", "status")}
        super().__init__(str(error.get("message", "the shared fetch failed")), **fields)
        self.code = str(error.get("code", "INTERNAL"))
        self.status = int(error.get("status", 502))
        retry_after = error.get("retry_after")
        if isinstance(retry_after, int | float):
            self.retry_after = float(retry_after)


def _whole_seconds(seconds: float) -> int:
    """``Retry-After`` takes whole seconds: rounded up, so a caller never comes back early."""
    return max(1, math.ceil(seconds))


class VendorRefusal(BrokerError):
    """The upstream was not called: a budget, rate limit, breaker or pause stopped the call.
    ``retry_after`` is when asking again can succeed; it rides in the error too, so a
    waiter that receives the failure from another sidecar answers with it as well."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, retry_after=_whole_seconds(retry_after))
        self.retry_after = float(_whole_seconds(retry_after))


class BudgetExhausted(VendorRefusal):
    code = "BUDGET_EXHAUSTED"
    status = 429


class RateLimited(VendorRefusal):
    code = "RATE_LIMITED"
    status = 429


class CircuitOpen(VendorRefusal):
    code = "CIRCUIT_OPEN"
    status = 503


class SourcePaused(VendorRefusal):
    code = "SOURCE_PAUSED"
    status = 503


class AuditBacklogFull(BrokerError):
    """The outbox is at its bound: refusing beats answering without a record."""

    code = "AUDIT_BACKLOG_FULL"
    status = 503
    retry_after = 5.0  # the writer ships a batch every second or so once the database is back


class ParseError(BrokerError):
    code = "PARSE_ERROR"
    status = 500


class InternalError(BrokerError):
    code = "INTERNAL"
    status = 500


class AdminError(BrokerError):
    """Errors of the admin routes, answered as ``{"detail": …, "code": …}``."""


class Unauthorized(AdminError):
    code = "UNAUTHORIZED"
    status = 401


class AdminDisabled(AdminError):
    code = "ADMIN_DISABLED"
    status = 403


class NotFound(AdminError):
    code = "NOT_FOUND"
    status = 404


class Conflict(AdminError):
    """400, not 409: the engine's SDK raises on any status its API does not declare."""

    code = "CONFLICT"
    status = 400


class Refused(AdminError):
    """A well-formed admin request the broker will not carry out: undeclared or reserved
    names, a change a published source may not take."""

    code = "REFUSED"
    status = 400


class ValidationFailed(AdminError):
    """A request that is not the route's shape: 422 in FastAPI's shape, because the
    engine's SDK parses it as such. ``errors`` is the ``detail`` list of ``{loc, msg,
    type}``, each ``loc`` starting where the value was: "body", "query" or "path"."""

    code = "VALIDATION_ERROR"
    status = 422

    def __init__(
        self,
        message: str,
        *,
        loc: tuple[str | int, ...] = ("body",),
        errors: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message, **extra)
        self.errors = errors or [{"loc": list(loc), "msg": message, "type": "value_error"}]


class BodyTooLarge(AdminError):
    code = "BODY_TOO_LARGE"
    status = 413


class DatabaseUnavailable(AdminError):
    """The database did not answer (down, or slower than its timeouts): retry later."""

    code = "DATABASE_UNAVAILABLE"
    status = 503


class RedisUnavailable(AdminError):
    """Redis did not answer a change that must reach it (an erasure): retry later."""

    code = "REDIS_UNAVAILABLE"
    status = 503


class StartupError(Exception):
    """A reason the process cannot start, as the one line an operator reads (never a secret):
    a bad or missing setting named by its variable, a service that does not answer, a
    database that needs ``databroker migrate``."""
