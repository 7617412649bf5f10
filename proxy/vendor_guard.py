"""Spend and vendor protection, the pure part: what a source's ``cost``, ``budget``,
``rate_limit`` and ``circuit_breaker`` ask of Redis, and what its answers mean.

The fleet-wide state lives in Redis (``proxy.vendor_state`` runs the scripts);
this module only turns a source's settings into script arguments, and a
script's reply into an admission or a refusal. Amounts are integers in
millionths (``Money.micros``) and times integers in microseconds, so Lua's
doubles hold them exactly.
"""

from __future__ import annotations

import calendar
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from proxy.errors import (
    BrokerError,
    BudgetExhausted,
    CircuitOpen,
    RateLimited,
    VendorRefusal,
)
from proxy.retry import parse_retry_after
from proxy.source_spec import MONEY_PLACES, Budget, CircuitBreaker, HTTPSource, Money, RateLimit

US = 1_000_000
"""Microseconds in a second: the scripts' time unit."""

_BREAKER_STATES = {"c": 0, "o": 1, "h": 2}

PROBE_RETRY = 1.0
"""Retry-After while a half-open breaker's probes are all out: they report within seconds."""

# HTTP_ERROR statuses that say the vendor failed, not the request: what a breaker counts.
# 429 is not one: a throttled vendor is working, and its Retry-After holds the source instead.
_FAILED_STATUS = range(500, 600)
_FAILURE_CODES = frozenset({"TIMEOUT", "CONNECTION_ERROR"})


@dataclass(frozen=True, slots=True)
class Admission:
    """A call the fleet let through: after ``wait`` seconds (its rate-limit turn)."""

    wait: float = 0.0
    probe: bool = False
    """A half-open breaker's probe: its outcome closes or reopens the breaker."""
    spent_micros: int | None = None
    """The period's spend after this call's reservation (budgeted sources)."""


@dataclass(frozen=True, slots=True)
class Plan:
    """One source's protection, as the scripts take it."""

    cost: Money | None
    budget: Budget | None
    rate_limit: RateLimit | None
    breaker: CircuitBreaker | None

    @classmethod
    def of(cls, http: HTTPSource) -> Plan:
        return cls(http.cost, http.budget, http.rate_limit, http.circuit_breaker)

    @property
    def scripted(self) -> bool:
        """Whether a call needs the fleet's say (a Redis round trip): cost alone does not."""
        return self.budget is not None or self.rate_limit is not None or self.breaker is not None

    def admit_args(self, now: float, max_wait: float, lease: float) -> tuple[str, list[int]]:
        """The spend key's period and the admit script's ARGV (see ``vendor_state.ADMIT``).

        ``max_wait``: the longest a call may wait for its rate-limit turn; ``lease``: how long
        a half-open probe may stay out before its slot is given to another (a sidecar that
        dies mid-probe must not keep the breaker half-open for good).
        """
        period, left = period_of(self.budget.period, now) if self.budget else ("", 0.0)
        rate = self.rate_limit
        interval = round(rate.per_seconds / rate.requests * US) if rate else 0
        return period, [
            self.cost.micros if self.cost and self.budget else 0,
            self.budget.micros if self.budget else -1,
            int(left) + 86_400,
            interval,
            rate.requests if rate else 0,
            round(max_wait * US),
            self.breaker.half_open_requests if self.breaker else 0,
            round(lease * US),
            round(self.breaker.window_seconds * US) if self.breaker else 0,
        ]

    def settle_args(self, failed: bool, probe: bool) -> list[int | float]:
        """The settle script's ARGV: one outcome for the breaker's window."""
        breaker = self.breaker
        assert breaker is not None
        return [
            int(failed),
            int(probe),
            breaker.failure_ratio,
            breaker.min_requests,
            round(breaker.window_seconds * US),
            round(breaker.open_seconds * US),
        ]

    def decide(self, reply: list[bytes | int], now: float) -> Admission | VendorRefusal:
        """The admit script's reply ``[verdict, µs, spent, probe, breaker state]``."""
        verdict = _text(reply[0])
        micros, spent, probe = int(reply[1]), int(reply[2]), bool(int(reply[3]))
        if verdict == "OK":
            return Admission(micros / US, probe, spent if self.budget else None)
        if verdict == "BUDGET_EXHAUSTED":
            assert self.budget is not None
            return budget_exhausted(self.budget, now)
        if verdict == "RATE_LIMITED":
            return RateLimited(
                f"rate limit of {_rate(self.rate_limit)} reached: no turn within the deadline",
                micros / US,
            )
        return CircuitOpen(
            "circuit breaker open: the upstream is failing; not called",
            micros / US if micros > 0 else PROBE_RETRY,
        )

    def remaining(self, spent_micros: int) -> float | None:
        """The budget left in the period, in its currency."""
        if self.budget is None:
            return None
        return float(Decimal(self.budget.micros - spent_micros).scaleb(-MONEY_PLACES))


def breaker_state(value: bytes | int | str) -> int:
    """A script's breaker state as the ``databroker_circuit_state`` gauge shows it:
    0 closed, 1 open, 2 half-open."""
    return _BREAKER_STATES.get(_text(value), 0)


def describe(
    plan: Plan,
    *,
    paused: bool,
    held_until: float | None,
    breaker: tuple[bytes | None, bytes | None],
    spent_micros: int,
    now: float,
) -> dict[str, Any]:
    """What an operator sees of a source's protection (``GET …/protection``): the pause,
    an upstream's hold, the period's spend against the budget, the breaker's state.
    ``breaker``: the hash's state and until (µs, Redis's clock, close to ours)."""
    described: dict[str, Any] = {
        "paused": paused,
        "held_for_seconds": None if held_until is None else max(held_until - now, 0.0),
        "cost": None if plan.cost is None else plan.cost.model_dump(),
        "rate_limit": None if plan.rate_limit is None else plan.rate_limit.model_dump(),
        "budget": None,
        "circuit_breaker": None,
    }
    if plan.budget is not None:
        _, left = period_of(plan.budget.period, now)
        described["budget"] = {
            **plan.budget.model_dump(),
            "spent": _amount(spent_micros),
            "remaining": _amount(max(plan.budget.micros - spent_micros, 0)),
            "period_ends_in_seconds": left,
        }
    if plan.breaker is not None:
        state, until = breaker
        code = breaker_state(state or b"c")
        open_for = int(until or 0) / US - now if code == 1 else 0.0
        described["circuit_breaker"] = {
            **plan.breaker.model_dump(),
            "state": ("closed", "open", "half-open")[code],
            "open_for_seconds": max(open_for, 0.0),
        }
    return described


def _amount(micros: int) -> str:
    """Millionths as the decimal string sources are written with (``"0.7"``, ``"12"``)."""
    return format(Decimal(micros).scaleb(-MONEY_PLACES).normalize(), "f")


def _text(value: bytes | int | str) -> str:
    """A script's reply as text (the client is made without decode_responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _rate(rate: RateLimit | None) -> str:
    return "?" if rate is None else f"{rate.requests} per {rate.per_seconds:g} s"


def budget_exhausted(budget: Budget, now: float) -> BudgetExhausted:
    _, left = period_of(budget.period, now)
    return BudgetExhausted(
        f"budget of {budget.amount} {budget.currency} per {budget.period} (UTC) reached; "
        "upstream calls resume when the period ends",
        left,
    )


def period_of(period: str, now: float) -> tuple[str, float]:
    """The UTC budget period holding ``now`` (``d2026-11-29``, ``m2026-11``) and the
    seconds left in it."""
    at = datetime.fromtimestamp(now, UTC)
    if period == "day":
        start = at.replace(hour=0, minute=0, second=0, microsecond=0)
        return f"d{at:%Y-%m-%d}", start.timestamp() + 86_400 - now
    days = calendar.monthrange(at.year, at.month)[1]
    start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return f"m{at:%Y-%m}", start.timestamp() + days * 86_400 - now


def hold_of(headers: Mapping[str, str], now: float) -> float | None:
    """How long an upstream's 429 asks the fleet to stay away: ``Retry-After`` (seconds or
    an HTTP date), else ``RateLimit-Reset`` (seconds, the IETF draft's form); None if neither."""
    retry_after = parse_retry_after(headers.get("retry-after"), now)
    if retry_after is not None:
        return retry_after
    reset = headers.get("ratelimit-reset", "").strip()
    return float(reset) if reset.isdigit() else None


def is_vendor_failure(error: BrokerError | None) -> bool:
    """Whether an outcome counts as the vendor failing, for its breaker: timeouts,
    connections that failed, 5xx answers. A 4xx says the request was wrong, not the vendor."""
    if error is None:
        return False
    if error.code in _FAILURE_CODES:
        return True
    return error.code == "HTTP_ERROR" and error.extra.get("upstream_status") in _FAILED_STATUS
