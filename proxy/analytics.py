"""The analytics figures, from the daily rollup's counters (``proxy.rollup``): no I/O here.

Definitions are the engine's (DESIGN.md, "The whole engine API"): days in UTC;
latency and error rate over the upstream calls (audit rows with timings); hit
ratio CACHE / (CACHE + REQUEST); percentages 0 to 100. Replayed requests are
counted apart and never as hits (a hybrid replay that made a fresh call is an
upstream call like any other). Every day of a window has its
point, 0 where nothing happened, so a chart needs no gap filling.
"""

from __future__ import annotations

import uuid
from collections import Counter as Counts
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from proxy.errors import ValidationFailed

DEFAULT_DAYS: Final = 30
# A window longer than this is refused: its answer would list every day.
MAX_DAYS: Final = 3660
TOP_SOURCES: Final = 10

# Metric names (the rollup's ``metric`` column); the label says what each splits by.
REQUESTS: Final = "requests"  # every audit row
HITS: Final = "hits"  # origin CACHE, not a replay
MISSES: Final = "misses"  # origin REQUEST (a hybrid replay's fresh call too)
REPLAYS: Final = "replays"  # rows with ``replay`` set; label: what it looked up by
UPSTREAM: Final = "upstream"  # rows with timings (upstream calls); total: latency ms
UPSTREAM_ERRORS: Final = "upstream_errors"  # upstream calls that failed
LATENCY: Final = "latency"  # upstream calls; label: the bucket's upper bound in ms
ERRORS: Final = "errors"  # label: the error's code
SPEND: Final = "spend"  # upstream calls with a cost; label: currency; total: amount
# The counters a series charts day by day; the others are read for a window as a whole.
DAILY: Final = (REQUESTS, HITS, MISSES, UPSTREAM, UPSTREAM_ERRORS)
# Before a metric's name: the counter of a project's sources together, not of one source.
PROJECT: Final = "*"

# Upper bounds of the latency buckets, ms, ten a decade; above the last is OVERFLOW.
BOUNDS: Final = tuple(
    float(f"{m}e{e}") for e in range(6) for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8)
)
OVERFLOW: Final = "inf"


def bucket_label(bound: float) -> str:
    """The label of the bucket whose upper bound is ``bound`` (``"1.5"``, ``"300"``)."""
    return f"{bound:g}"


@dataclass(frozen=True, slots=True)
class Counter:
    """One row of the rollup: ``n`` rows, ``total`` summed (latency ms, cost)."""

    data_source_id: uuid.UUID
    day: date
    metric: str
    label: str
    n: int
    total: Decimal


@dataclass(frozen=True, slots=True)
class Window:
    """Days ``start`` to ``end``, both included, in UTC."""

    start: date
    end: date

    def days(self) -> list[date]:
        return [self.start + timedelta(days=i) for i in range((self.end - self.start).days + 1)]


def _date(name: str, given: str | None) -> date | None:
    if given is None:
        return None
    try:
        if len(given) != 10:
            raise ValueError(given)
        return date.fromisoformat(given)
    except ValueError:
        raise _invalid(name, "Input should be a valid date in the format YYYY-MM-DD") from None


def _invalid(name: str, msg: str) -> ValidationFailed:
    return ValidationFailed(f"{name}: {msg}", loc=("query", name))


def window(start_date: str | None, end_date: str | None, today: date) -> Window:
    """The window a request asks for; by default the 30 days that end today."""
    start, end = _date("start_date", start_date), _date("end_date", end_date)
    if end is None:
        end = today if start is None else max(today, start)
    if start is None:
        try:
            start = end - timedelta(days=DEFAULT_DAYS - 1)
        except OverflowError:
            raise _invalid("end_date", "end_date is too early") from None
    if end < start:
        raise _invalid("end_date", "end_date is before start_date")
    if (end - start).days >= MAX_DAYS:
        raise _invalid("start_date", f"a window is at most {MAX_DAYS} days")
    return Window(start, end)


@dataclass(frozen=True, slots=True)
class Cost:
    """The price of one upstream call, as a source declares it (``source.cost``)."""

    amount: Decimal
    currency: str


def cost_of(source: Mapping[str, Any]) -> Cost | None:
    """A stored source spec's ``cost``, or None when it has none or none that makes sense."""
    cost = source.get("cost")
    if not isinstance(cost, Mapping):
        return None
    amount, currency = cost.get("amount"), cost.get("currency")
    if not isinstance(currency, str) or isinstance(amount, bool):
        return None
    try:
        value = Decimal(str(amount))
    except (InvalidOperation, ValueError):
        return None
    return Cost(value, currency) if value.is_finite() and value >= 0 else None


@dataclass(slots=True)
class Tally:
    """Counters added up: of a day, a source, or a project."""

    requests: int = 0
    hits: int = 0
    misses: int = 0
    upstream: int = 0
    upstream_errors: int = 0
    latency_ms_total: Decimal = Decimal(0)
    replays: Counts[str] = field(default_factory=Counts)
    latency: Counts[str] = field(default_factory=Counts)
    errors: Counts[str] = field(default_factory=Counts)
    spend: dict[str, Decimal] = field(default_factory=dict)

    def add(self, c: Counter) -> None:
        if c.metric == REQUESTS:
            self.requests += c.n
        elif c.metric == HITS:
            self.hits += c.n
        elif c.metric == MISSES:
            self.misses += c.n
        elif c.metric == UPSTREAM:
            self.upstream += c.n
            self.latency_ms_total += c.total
        elif c.metric == UPSTREAM_ERRORS:
            self.upstream_errors += c.n
        elif c.metric == REPLAYS:
            self.replays[c.label] += c.n
        elif c.metric == LATENCY:
            self.latency[c.label] += c.n
        elif c.metric == ERRORS:
            self.errors[c.label] += c.n
        elif c.metric == SPEND:
            self.spend[c.label] = self.spend.get(c.label, Decimal(0)) + c.total

    def merge(self, other: Tally) -> None:
        self.requests += other.requests
        self.hits += other.hits
        self.misses += other.misses
        self.upstream += other.upstream
        self.upstream_errors += other.upstream_errors
        self.latency_ms_total += other.latency_ms_total
        self.replays.update(other.replays)
        self.latency.update(other.latency)
        self.errors.update(other.errors)
        for currency, amount in other.spend.items():
            self.spend[currency] = self.spend.get(currency, Decimal(0)) + amount

    @property
    def hit_ratio(self) -> float:
        """CACHE / (CACHE + REQUEST), percent."""
        return _percent(self.hits, self.hits + self.misses)

    @property
    def error_rate(self) -> float:
        """Failed upstream calls / upstream calls, percent."""
        return _percent(self.upstream_errors, self.upstream)

    @property
    def avg_ms(self) -> float:
        return round(float(self.latency_ms_total) / self.upstream, 3) if self.upstream else 0.0

    def percentile(self, q: float) -> float:
        """The latency (ms) below which ``q`` of the upstream calls fall, interpolated
        inside its bucket; 0 with no calls."""
        total = sum(self.latency.values())
        if not total:
            return 0.0
        rank, seen, lower = q * total, 0, 0.0
        for bound in BOUNDS:
            n = self.latency.get(bucket_label(bound), 0)
            if n and seen + n >= rank:
                return round(lower + (bound - lower) * (rank - seen) / n, 3)
            seen, lower = seen + n, bound
        return lower  # in the overflow bucket: no upper bound to interpolate towards

    def latency_ms(self) -> dict[str, float]:
        return {
            "avg": self.avg_ms,
            "p50": self.percentile(0.50),
            "p95": self.percentile(0.95),
            "p99": self.percentile(0.99),
        }

    def spend_saved(self, cost: Cost | None) -> dict[str, Decimal]:
        """What the hits would have cost as upstream calls, at the source's current price."""
        return {cost.currency: cost.amount * self.hits} if cost and self.hits else {}


def _percent(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 2) if whole else 0.0


def amounts(by_currency: Mapping[str, Decimal]) -> list[dict[str, str]]:
    """``[{"currency", "amount"}]``, amounts as decimal text, as ``source.cost`` gives them."""
    return [
        {"currency": currency, "amount": f"{amount.normalize():f}"}
        for currency, amount in sorted(by_currency.items())
    ]


def by_day(counters: Iterable[Counter], w: Window) -> dict[date, Tally]:
    """One tally for each day of the window, empty where nothing happened."""
    days = {day: Tally() for day in w.days()}
    for c in counters:
        if c.day in days:
            days[c.day].add(c)
    return days


def total(tallies: Iterable[Tally]) -> Tally:
    whole = Tally()
    for t in tallies:
        whole.merge(t)
    return whole


def _series(days: Mapping[date, Tally], value: Any) -> list[dict[str, Any]]:
    return [{"date": day.isoformat(), "value": value(t)} for day, t in days.items()]


def _dates(w: Window) -> dict[str, str]:
    return {"start_date": w.start.isoformat(), "end_date": w.end.isoformat()}


def usage(counters: Iterable[Counter], w: Window, cost: Cost | None) -> dict[str, Any]:
    days = by_day(counters, w)
    whole = total(days.values())
    return {
        "requests_by_date": _series(days, lambda t: t.requests),
        **_dates(w),
        "total_requests": whole.requests,
        "replays": whole.replays.total(),
        "spend": amounts(whole.spend),
        "spend_saved": amounts(whole.spend_saved(cost)),
    }


def metrics(counters: Iterable[Counter], w: Window) -> dict[str, Any]:
    days = by_day(counters, w)
    whole = total(days.values())
    return {
        "avg_response_time_by_date": _series(days, lambda t: t.avg_ms),
        "error_rate_by_date": _series(days, lambda t: t.error_rate),
        **_dates(w),
        "upstream_calls": whole.upstream,
        "error_rate": whole.error_rate,
        "latency_ms": whole.latency_ms(),
        "errors_by_code": dict(whole.errors.most_common()),
    }


def cache_stats(counters: Iterable[Counter], w: Window) -> dict[str, Any]:
    days = by_day(counters, w)
    whole = total(days.values())
    return {
        "cache_hit_ratio_by_date": _series(days, lambda t: t.hit_ratio),
        **_dates(w),
        "hits": whole.hits,
        "misses": whole.misses,
        "replays": whole.replays.total(),
        "cache_hit_ratio": whole.hit_ratio,
    }


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What the summary says about a source besides its counters."""

    name: str
    cost: Cost | None


def summary(
    whole: Iterable[Counter],
    ranked: Iterable[Counter],
    w: Window,
    project_id: uuid.UUID | None,
    sources: Mapping[uuid.UUID, SourceInfo],
) -> dict[str, Any]:
    """The seed's four figures across a project's sources, plus percentiles, errors and spend:
    ``whole`` are the project's counters, ``ranked`` its sources' requests, hits and misses."""
    total = Tally()
    for c in whole:
        total.add(c)
    per_source: dict[uuid.UUID, Tally] = {}
    for c in ranked:
        per_source.setdefault(c.data_source_id, Tally()).add(c)
    saved: dict[str, Decimal] = {}
    for sid, t in per_source.items():
        info = sources.get(sid)
        for currency, amount in t.spend_saved(info.cost if info else None).items():
            saved[currency] = saved.get(currency, Decimal(0)) + amount
    ranking = sorted(per_source.items(), key=lambda item: (-item[1].requests, str(item[0])))
    return {
        **_dates(w),
        "project_id": None if project_id is None else str(project_id),
        "requests": total.requests,
        "hit_rate": total.hit_ratio,
        "avg_latency_ms": total.avg_ms,
        "error_rate": total.error_rate,
        "top_sources": [
            {
                "data_source_id": str(sid),
                "name": sources[sid].name if sid in sources else None,
                "requests": t.requests,
                "hit_rate": t.hit_ratio,
            }
            for sid, t in ranking[:TOP_SOURCES]
            if t.requests
        ],
        "latency_ms": total.latency_ms(),
        "errors_by_code": dict(total.errors.most_common()),
        "hits": total.hits,
        "misses": total.misses,
        "replays": total.replays.total(),
        "upstream_calls": total.upstream,
        "spend": amounts(total.spend),
        "spend_saved": amounts(saved),
    }


def render(summary: Mapping[str, Any]) -> str:
    """The summary as ``databroker stats`` prints it: the seed's four figures, then the rest."""

    def money(key: str) -> str:
        return ", ".join(f"{a['amount']} {a['currency']}" for a in summary[key]) or "0"

    latency = summary["latency_ms"]
    project = summary["project_id"] or "global"
    lines = [
        f"{summary['start_date']} to {summary['end_date']} (UTC), project {project}",
        "",
        f"{'hit rate':<18}{summary['hit_rate']:.2f} %",
        f"{'average latency':<18}{summary['avg_latency_ms']:.1f} ms"
        f" (p50 {latency['p50']:.1f}, p95 {latency['p95']:.1f}, p99 {latency['p99']:.1f})",
        f"{'error rate':<18}{summary['error_rate']:.2f} % of"
        f" {summary['upstream_calls']} upstream calls",
        f"{'requests':<18}{summary['requests']}"
        f" ({summary['hits']} hits, {summary['misses']} misses, {summary['replays']} replays)",
        f"{'spend':<18}{money('spend')} (saved by hits: {money('spend_saved')})",
        "",
    ]
    top = summary["top_sources"]
    width = max([len("top sources"), *(len(s["name"] or s["data_source_id"]) for s in top)]) + 2
    lines.append(f"{'top sources':<{width}}{'requests':>10}{'hit rate':>12}")
    lines.extend(
        f"{s['name'] or s['data_source_id']:<{width}}{s['requests']:>10}{s['hit_rate']:>10.2f} %"
        for s in top
    )
    if not top:
        lines.append("(no requests in this window)")
    return "\n".join(lines)
