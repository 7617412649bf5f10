"""What a user writes to register a data source (the reference's DataSourceSpec): validated
shapes, no I/O. ``source_store`` keeps them in the database; ``source_registry`` serves them.

Unknown fields anywhere in a source are rejected (``extra="forbid"``) so a
typo such as ``"ttl_seconds"`` fails loudly instead of being ignored.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from functools import cached_property
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from proxy.auth import AuthConfig
from proxy.types import Method, ResponseType

DEFAULT_STATUS_FORCELIST = (429, 500, 502, 503, 504)
MAX_NAME_LENGTH = 200
"""The longest name of a data source or of a variable: the length of their columns."""
MAX_SECONDS = 2**31 - 1
"""The longest ttl and stale_if_error (68 years): their columns are 32-bit integers."""
MAX_RETENTION_DAYS = 36_500
"""A century: longer is forever in practice, which is what leaving retention_days unset says."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetryPolicy(_Strict):
    max_retries: int = Field(ge=0, le=10)
    backoff_factor: float | None = Field(default=None, ge=0, le=60)
    status_forcelist: list[int] | None = None
    non_idempotent: bool | None = Field(
        default=None,
        description="Retry POST/PATCH even after the upstream may have received the request.",
    )

    @field_validator("status_forcelist")
    @classmethod
    def _statuses_are_http(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(not 100 <= s <= 599 for s in value):
            raise ValueError("status_forcelist holds HTTP statuses (100-599)")
        return value


MONEY_PLACES = 6
"""Decimal places of an amount: those of ``run_data_request.cost_amount`` (NUMERIC(18,6))."""


class Money(_Strict):
    """An amount as a decimal string (``"0.35"``), never a float: spend is summed exactly."""

    amount: str = Field(pattern=rf"^\d{{1,12}}(\.\d{{1,{MONEY_PLACES}}})?$")
    currency: str = Field(pattern=r"^[A-Z]{3}$", description="ISO 4217, e.g. USD")

    @cached_property
    def micros(self) -> int:
        """The amount in millionths: what Redis counts (integers add exactly)."""
        return int(Decimal(self.amount).scaleb(MONEY_PLACES))


class Budget(Money):
    period: Literal["day", "month"] = Field(description="UTC day or UTC calendar month")

    @field_validator("amount")
    @classmethod
    def _positive(cls, value: str) -> str:
        if Decimal(value) <= 0:
            raise ValueError("a budget is more than 0")
        return value


class RateLimit(_Strict):
    """A burst of ``requests``, then ``requests`` per ``per_seconds``, fleet-wide."""

    requests: int = Field(ge=1, le=1_000_000)
    per_seconds: float = Field(gt=0, le=86_400)


class CircuitBreaker(_Strict):
    """Opens when ``failure_ratio`` of at least ``min_requests`` calls in a window of
    ``window_seconds`` failed; stays open ``open_seconds``; then lets
    ``half_open_requests`` probes through (fleet-wide) and closes on a success."""

    failure_ratio: float = Field(gt=0, le=1)
    min_requests: int = Field(ge=1, le=1_000_000)
    window_seconds: float = Field(gt=0, le=86_400)
    open_seconds: float = Field(gt=0, le=86_400)
    half_open_requests: int = Field(default=1, ge=1, le=1_000)


class HTTPSource(_Strict):
    url: str = Field(min_length=1, max_length=8192)
    method: Method = "GET"
    headers: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    body: dict[str, Any] | str | None = None
    timeout: float | None = Field(default=None, gt=0, le=600)
    retry: RetryPolicy | None = None
    response_type: ResponseType = "PLAIN_TEXT"
    auth: AuthConfig | None = None
    max_response_bytes: int | None = Field(default=None, gt=0)
    max_concurrency: int | None = Field(default=None, gt=0, le=10_000)
    # None (unset) rather than False by default: stored sources and admin answers keep
    # the reference's shape unless a source opts in.
    follow_redirects: bool | None = Field(
        default=None,
        description="true: follow up to 5 redirects, each hop checked by the egress policy; "
        "unset or false: a 3xx is the answer (HTTP_ERROR).",
    )
    cost: Money | None = Field(default=None, description="The price of one upstream call.")
    budget: Budget | None = Field(
        default=None, description="Spend allowed per UTC period, fleet-wide; needs a cost."
    )
    rate_limit: RateLimit | None = None
    circuit_breaker: CircuitBreaker | None = None

    @model_validator(mode="after")
    def _budget_in_cost_currency(self) -> Self:
        if self.budget is not None and (
            self.cost is None or self.cost.currency != self.budget.currency
        ):
            raise ValueError("a budget needs a cost in the same currency")
        return self

    @field_validator("body")
    @classmethod
    def _empty_body_is_none(cls, value: dict[str, Any] | str | None) -> dict[str, Any] | str | None:
        """``{}`` is the engine's default body, which the admin API shows for "no body": so
        a source read and written back unchanged is unchanged (a literal ``{}`` is sent
        as the string ``"{}"`` with a JSON Content-Type)."""
        return None if value == {} else value


class CachingTTL(_Strict):
    days: int = Field(default=0, ge=0)
    hours: int = Field(default=0, ge=0)
    minutes: int = Field(default=0, ge=0)
    seconds: int = Field(default=0, ge=0)

    @property
    def total_seconds(self) -> int:
        return ((self.days * 24 + self.hours) * 60 + self.minutes) * 60 + self.seconds


class CachingOptions(_Strict):
    enabled: bool = False
    ttl: CachingTTL | int | None = None
    stale_if_error: int | None = Field(default=None, ge=0, le=MAX_SECONDS)

    @field_validator("ttl")
    @classmethod
    def _ttl_positive(cls, value: CachingTTL | int | None) -> CachingTTL | int | None:
        seconds = value.total_seconds if isinstance(value, CachingTTL) else value
        if seconds is not None and not 0 < seconds <= MAX_SECONDS:
            raise ValueError(f"ttl must be 1 to {MAX_SECONDS} seconds, or null for no expiry")
        return value

    @property
    def ttl_seconds(self) -> int | None:
        """The TTL as Redis wants it; ``None`` means the entry never expires."""
        return self.ttl.total_seconds if isinstance(self.ttl, CachingTTL) else self.ttl


class DataSourceSpec(_Strict):
    """The body of ``POST /data-sources`` and ``PUT /data-sources/{id}``."""

    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH, pattern=r"^[^\x00-\x1f\x7f]+$")
    source: HTTPSource
    caching: CachingOptions = Field(default_factory=CachingOptions)
    retention_days: int | None = Field(
        default=None,
        ge=1,
        le=MAX_RETENTION_DAYS,
        description="Days this source's DataObjects and audit rows are kept, each aged by its "
        "own created_at; unset: DATABROKER_RETENTION_DAYS, and if that is unset too, forever.",
    )
    # No NUL: Postgres text cannot hold one (the insert would fail as a 500).
    description: str | None = Field(default=None, max_length=10_000, pattern=r"^[^\x00]*$")
    metadata: dict[str, Any] | None = None
    runtime_params: list[str] | None = None
    variables: list[str] | None = None
    project_id: uuid.UUID | None = None
