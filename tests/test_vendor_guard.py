"""Spend and vendor protection, the pure part: settings, periods, holds, verdicts."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from proxy.errors import (
    BudgetExhausted,
    CircuitOpen,
    RateLimited,
    RelayedError,
    UpstreamHTTPError,
    UpstreamTimeout,
)
from proxy.lifecycle import forbidden_changes
from proxy.source_spec import DataSourceSpec, HTTPSource
from proxy.vendor_guard import (
    Admission,
    Plan,
    describe,
    hold_of,
    is_vendor_failure,
    period_of,
)

COST = {"amount": "0.35", "currency": "USD"}
BUDGET = {"amount": "1.00", "currency": "USD", "period": "day"}
BREAKER = {
    "failure_ratio": 0.5,
    "min_requests": 4,
    "window_seconds": 10,
    "open_seconds": 2.5,
    "half_open_requests": 2,
}


def _at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def _plan(**source: Any) -> Plan:
    return Plan.of(HTTPSource(url="http://vendor.test/", **source))


@pytest.mark.parametrize("amount", ["0", "0.35", "12", "999999999999.999999"])
def test_a_cost_is_a_decimal_string(amount: str) -> None:
    cost = HTTPSource(url="http://x/", cost={"amount": amount, "currency": "EUR"}).cost
    assert cost is not None and cost.amount == amount


@pytest.mark.parametrize(
    "cost",
    [
        {"amount": 0.35, "currency": "USD"},  # a float is not exact money
        {"amount": "-1", "currency": "USD"},
        {"amount": "0.1234567", "currency": "USD"},  # past the column's 6 places
        {"amount": "1e3", "currency": "USD"},
        {"amount": "1", "currency": "usd"},
        {"amount": "1", "currency": "USD", "per": "call"},
    ],
)
def test_a_bad_cost_is_refused(cost: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        HTTPSource(url="http://x/", cost=cost)


def test_micros_are_exact() -> None:
    cost = HTTPSource(url="http://x/", cost={"amount": "0.000001", "currency": "USD"}).cost
    assert cost is not None and cost.micros == 1
    assert _plan(cost=COST, budget=BUDGET).budget.micros == 1_000_000  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "source",
    [
        {"budget": BUDGET},  # no cost to count
        {"cost": {"amount": "1", "currency": "EUR"}, "budget": BUDGET},
        {"cost": COST, "budget": {**BUDGET, "amount": "0"}},
        {"cost": COST, "budget": {**BUDGET, "period": "week"}},
        {"rate_limit": {"requests": 0, "per_seconds": 1}},
        {"rate_limit": {"requests": 5, "per_seconds": 0}},
        {"circuit_breaker": {**BREAKER, "failure_ratio": 1.5}},
        {"circuit_breaker": {**BREAKER, "half_open_requests": 0}},
    ],
)
def test_bad_protection_is_refused(source: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        HTTPSource(url="http://x/", **source)


def test_a_published_source_may_change_its_budget_only() -> None:
    def spec(**source: Any) -> DataSourceSpec:
        return DataSourceSpec.model_validate(
            {"name": "bureau", "source": {"url": "http://x/", **source}}
        )

    old = spec(cost=COST, budget=BUDGET)
    assert forbidden_changes(old, spec(cost=COST, budget={**BUDGET, "amount": "9"})) == []
    dearer = spec(cost={**COST, "amount": "1"}, budget=BUDGET)
    assert forbidden_changes(old, dearer) == ["source.cost"]
    limited = spec(cost=COST, budget=BUDGET, rate_limit={"requests": 1, "per_seconds": 1})
    assert forbidden_changes(old, limited) == ["source.rate_limit"]


@pytest.mark.parametrize(
    ("period", "now", "label", "left"),
    [
        ("day", "2026-11-29T23:59:30", "d2026-11-29", 30),
        ("day", "2026-11-30T00:00:00", "d2026-11-30", 86_400),
        ("month", "2026-02-28T12:00:00", "m2026-02", 43_200),
        ("month", "2028-02-28T12:00:00", "m2028-02", 43_200 + 86_400),  # a leap year
        ("month", "2026-12-31T23:00:00", "m2026-12", 3_600),
    ],
)
def test_budget_periods_are_utc(period: str, now: str, label: str, left: float) -> None:
    assert period_of(period, _at(now)) == (label, pytest.approx(left))


def test_an_upstream_429_holds_for_retry_after_else_ratelimit_reset() -> None:
    now = _at("2026-11-29T12:00:00")
    assert hold_of({"retry-after": "7"}, now) == 7
    assert hold_of({"retry-after": "Sun, 29 Nov 2026 12:00:30 GMT"}, now) == pytest.approx(30)
    assert hold_of({"ratelimit-reset": "12"}, now) == 12
    assert hold_of({"retry-after": "3", "ratelimit-reset": "12"}, now) == 3
    assert hold_of({"ratelimit-reset": "soon"}, now) is None
    assert hold_of({}, now) is None


def test_vendor_failures_are_timeouts_connections_and_5xx() -> None:
    assert is_vendor_failure(UpstreamTimeout("slow"))
    assert is_vendor_failure(UpstreamHTTPError(503))
    assert not is_vendor_failure(UpstreamHTTPError(404))  # the request was wrong
    assert not is_vendor_failure(UpstreamHTTPError(429, 5.0))  # throttled: held instead
    assert not is_vendor_failure(None)
    relayed = RelayedError({"code": "HTTP_ERROR", "message": "x", "upstream_status": 502})
    assert is_vendor_failure(relayed)


def test_admit_arguments_in_micro_units() -> None:
    plan = _plan(
        cost=COST,
        budget=BUDGET,
        rate_limit={"requests": 4, "per_seconds": 2},
        circuit_breaker=BREAKER,
    )
    period, args = plan.admit_args(_at("2026-11-29T23:00:00"), max_wait=1.5, lease=3)
    assert period == "d2026-11-29"
    assert args == [
        350_000, 1_000_000, 3_600 + 86_400, 500_000, 4, 1_500_000, 2, 3_000_000, 10_000_000
    ]  # fmt: skip
    assert plan.settle_args(failed=True, probe=False) == [1, 0, 0.5, 4, 10_000_000, 2_500_000]


def test_cost_alone_needs_no_round_trip() -> None:
    assert not _plan(cost=COST).scripted
    assert _plan(rate_limit={"requests": 1, "per_seconds": 1}).scripted
    # No budget: nothing is counted in Redis, whatever the cost.
    _, args = _plan(cost=COST, circuit_breaker=BREAKER).admit_args(0.0, 1, 1)
    assert args[:2] == [0, -1]


def test_verdicts() -> None:
    now = _at("2026-11-29T18:00:00")
    plan = _plan(
        cost=COST,
        budget=BUDGET,
        rate_limit={"requests": 2, "per_seconds": 1},
        circuit_breaker=BREAKER,
    )
    assert plan.decide([b"OK", 250_000, 700_000, 1, b"h"], now) == Admission(0.25, True, 700_000)
    assert plan.remaining(700_000) == pytest.approx(0.3)
    spent = plan.decide([b"BUDGET_EXHAUSTED", 0, 1_050_000, 0, b"c"], now)
    assert isinstance(spent, BudgetExhausted)
    assert "1.00 USD per day" in spent.message and spent.status == 429
    assert spent.retry_after == 6 * 3600
    limited = plan.decide([b"RATE_LIMITED", 2_100_000, 0, 0, b"c"], now)
    assert isinstance(limited, RateLimited) and limited.retry_after == 3  # whole seconds, up
    assert limited.to_dict()["retry_after"] == 3
    opened = plan.decide([b"CIRCUIT_OPEN", 1_000, 0, 0, b"o"], now)
    assert isinstance(opened, CircuitOpen) and opened.status == 503 and opened.retry_after == 1


def test_a_relayed_refusal_keeps_its_retry_after() -> None:
    relayed = RelayedError(
        {"code": "RATE_LIMITED", "message": "m", "status": 429, "retry_after": 4}
    )
    assert (relayed.code, relayed.status, relayed.retry_after) == ("RATE_LIMITED", 429, 4.0)


def test_what_an_operator_sees() -> None:
    now = _at("2026-11-29T18:00:00")
    plan = _plan(cost=COST, budget=BUDGET, circuit_breaker=BREAKER)
    seen = describe(
        plan,
        paused=True,
        held_until=now + 12.5,
        breaker=(b"o", str(int((now + 2) * 1_000_000)).encode()),
        spent_micros=700_000,
        now=now,
    )
    assert seen["paused"] is True and seen["held_for_seconds"] == 12.5
    assert seen["cost"] == COST and seen["rate_limit"] is None
    assert seen["budget"] == {
        **BUDGET,
        "spent": "0.7",
        "remaining": "0.3",
        "period_ends_in_seconds": 6 * 3600,
    }
    assert seen["circuit_breaker"]["state"] == "open"
    assert seen["circuit_breaker"]["open_for_seconds"] == pytest.approx(2)
    quiet = describe(
        _plan(cost=COST, budget={**BUDGET, "amount": "2"}, circuit_breaker=BREAKER),
        paused=False,
        held_until=None,
        breaker=(None, None),
        spent_micros=2_100_000,  # a budget lowered below what was spent
        now=now,
    )
    assert quiet["held_for_seconds"] is None and quiet["budget"]["remaining"] == "0"
    assert quiet["budget"]["spent"] == "2.1"
    assert quiet["circuit_breaker"]["state"] == "closed"
