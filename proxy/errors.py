"""The broker's error tree: one stable ``code`` and one HTTP status per failure.

    BrokerError
    ├── InvalidRequest ............ 400 INVALID_REQUEST
    ├── DataSourceNotFound ........ 404 DATA_SOURCE_NOT_FOUND
    ├── MissingVariables .......... 400 MISSING_VARIABLES  (names only, never values)
    ├── MissingParams ............. 400 MISSING_PARAMS
    ├── UnknownParams ............. 400 UNKNOWN_PARAMS
    ├── InvalidParam .............. 400 INVALID_PARAM      (names the parameter, never its value)
    ├── UpstreamError ............. 502
    │   ├── UpstreamTimeout ....... 502 TIMEOUT
    │   ├── UpstreamConnectError .. 502 CONNECTION_ERROR
    │   ├── UpstreamHTTPError ..... 502 HTTP_ERROR         (+ upstream_status)
    │   └── ResponseTooLarge ...... 502 RESPONSE_TOO_LARGE
    ├── ParseError ................ 500 PARSE_ERROR
    ├── InternalError ............. 500 INTERNAL
    └── AdminError ................ admin routes only
        ├── Unauthorized .......... 401 UNAUTHORIZED
        ├── AdminDisabled ......... 403 ADMIN_DISABLED
        ├── NotFound .............. 404 NOT_FOUND
        ├── Conflict .............. 409 CONFLICT
        └── ValidationFailed ...... 422 VALIDATION_ERROR

Lower-level exceptions (httpx, redis, SQLAlchemy) are translated where they
enter, with ``raise … from exc``. Messages are written for the caller and must
never carry a secret: callers build them from names, never from values.
"""

from __future__ import annotations

from typing import Any, ClassVar


class BrokerError(Exception):
    code: ClassVar[str] = "INTERNAL"
    status: ClassVar[int] = 500

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


class UnknownParams(BrokerError):
    code = "UNKNOWN_PARAMS"
    status = 400

    def __init__(self, names: list[str]) -> None:
        super().__init__(f"configured_params has undeclared: {', '.join(names)}", params=names)


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

    def __init__(self, upstream_status: int) -> None:
        super().__init__(
            f"upstream answered HTTP {upstream_status}", upstream_status=upstream_status
        )
        self.upstream_status = upstream_status


class ResponseTooLarge(UpstreamError):
    code = "RESPONSE_TOO_LARGE"

    def __init__(self, limit: int) -> None:
        super().__init__(f"upstream body exceeds {limit} bytes", limit=limit)


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
    code = "CONFLICT"
    status = 409


class ValidationFailed(AdminError):
    code = "VALIDATION_ERROR"
    status = 422
