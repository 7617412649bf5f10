"""Analytics: the pure figures, and the routes on Postgres and SQLite over audit rows the test
wrote through the outbox's sink, checked against figures computed here from those rows."""

from __future__ import annotations

import asyncio
import math
import statistics
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy import analytics, rollup_reads
from proxy.app import create_app
from proxy.cli import main
from proxy.database import Database
from proxy.engine import create_engine, migrate
from proxy.errors import ValidationFailed
from proxy.outbox import RunDataRequestRecord, encode
from proxy.settings import Settings
from proxy.tables import data_source
from proxy.writer import sink_for
from tests.conftest import Over
from tests.harness import ADMIN_TOKEN, admin_headers, register
from tests.servers import serve_in_thread

TODAY = date(2026, 3, 15)

# --- the pure figures ---------------------------------------------------------------------


def test_the_default_window_is_the_30_days_that_end_today() -> None:
    w = analytics.window(None, None, TODAY)
    assert (w.start, w.end) == (date(2026, 2, 14), TODAY)
    assert len(w.days()) == 30
    assert analytics.window("2026-03-01", None, TODAY) == analytics.Window(date(2026, 3, 1), TODAY)
    assert analytics.window(None, "2026-01-30", TODAY).start == date(2026, 1, 1)
    assert analytics.window("2026-03-20", None, TODAY).end == date(2026, 3, 20)


@pytest.mark.parametrize(
    ("start", "end", "field"),
    [
        ("yesterday", None, "start_date"),
        ("", None, "start_date"),
        ("2026-3-1", None, "start_date"),
        (None, "2026-02-30", "end_date"),
        ("2026-03-02", "2026-03-01", "end_date"),
        ("2000-01-01", None, "start_date"),  # longer than MAX_DAYS
        (None, "0001-01-02", "end_date"),
    ],
)
def test_a_bad_window_is_refused_naming_its_parameter(
    start: str | None, end: str | None, field: str
) -> None:
    with pytest.raises(ValidationFailed) as refused:
        analytics.window(start, end, TODAY)
    assert refused.value.errors[0]["loc"] == ["query", field]


@pytest.mark.parametrize(
    ("spec", "cost"),
    [
        ({"cost": {"amount": "0.35", "currency": "USD"}}, analytics.Cost(Decimal("0.35"), "USD")),
        ({"cost": {"amount": 2, "currency": "EUR"}}, analytics.Cost(Decimal(2), "EUR")),
        ({}, None),
        ({"cost": "0.35"}, None),
        ({"cost": {"amount": "x", "currency": "USD"}}, None),
        ({"cost": {"amount": "-1", "currency": "USD"}}, None),
        ({"cost": {"amount": "NaN", "currency": "USD"}}, None),
        ({"cost": {"amount": True, "currency": "USD"}}, None),
        ({"cost": {"amount": "1"}}, None),
    ],
)
def test_a_sources_cost_is_read_defensively(
    spec: dict[str, Any], cost: analytics.Cost | None
) -> None:
    assert analytics.cost_of(spec) == cost


def _latencies(*ms: float) -> analytics.Tally:
    tally = analytics.Tally()
    for value in ms:
        bound = next((b for b in analytics.BOUNDS if value <= b), None)
        label = analytics.OVERFLOW if bound is None else analytics.bucket_label(bound)
        tally.latency[label] += 1
    return tally


def test_percentiles_interpolate_inside_a_bucket() -> None:
    # One call in (80, 100], one in (250, 300]: the 75th percentile is halfway into the second.
    tally = _latencies(100, 300)
    assert tally.percentile(0.5) == pytest.approx(100.0)
    assert tally.percentile(0.75) == pytest.approx(275.0)
    assert tally.percentile(1.0) == pytest.approx(300.0)
    assert analytics.Tally().percentile(0.99) == 0.0
    # Above the last bound nothing bounds the value: the last bound is what is known.
    assert _latencies(10**7).percentile(0.5) == analytics.BOUNDS[-1]


def test_percentiles_stay_within_a_quarter_of_the_exact_value() -> None:
    values = [1.7 * 1.013**i for i in range(700)]  # 1.7 ms to 15 s
    tally = _latencies(*values)
    for q in (0.5, 0.95, 0.99):
        exact = sorted(values)[math.ceil(q * len(values)) - 1]
        assert abs(tally.percentile(q) - exact) <= 0.25 * exact


def test_rates_are_percentages_and_empty_is_zero() -> None:
    tally = analytics.Tally(hits=1, misses=3, upstream=4, upstream_errors=1)
    assert (tally.hit_ratio, tally.error_rate) == (25.0, 25.0)
    assert (analytics.Tally().hit_ratio, analytics.Tally().error_rate) == (0.0, 0.0)
    assert analytics.Tally().avg_ms == 0.0


def test_amounts_are_decimal_text() -> None:
    assert analytics.amounts({"USD": Decimal("1.400000"), "EUR": Decimal("10")}) == [
        {"currency": "EUR", "amount": "10"},
        {"currency": "USD", "amount": "1.4"},
    ]


# --- the routes, on each database -----------------------------------------------------------

PROJECT, OTHER_PROJECT = uuid.uuid4(), uuid.uuid4()


@dataclass
class Served:
    """A running broker on one database, and that database, where the test writes audit rows."""

    url: str
    client: httpx.AsyncClient
    engine: AsyncEngine
    database: Database

    async def get(self, path: str, **params: Any) -> Any:
        answer = await self.client.get(path, params=params, headers=admin_headers())
        assert answer.status_code == 200, answer.text
        return answer.json()

    async def source(
        self, name: str, project: uuid.UUID | None, cost: dict[str, str] | None
    ) -> uuid.UUID:
        spec: dict[str, Any] = {"name": name, "source": {"url": "http://127.0.0.1:9/x"}}
        if cost is not None:
            spec["source"]["cost"] = cost
        if project is not None:
            spec["project_id"] = str(project)
        return uuid.UUID((await register(self.client, spec, publish=False))["data_source_id"])


@pytest.fixture(params=["postgresql", "sqlite"])
async def served(
    request: pytest.FixtureRequest,
    settings: Settings,
    db: AsyncEngine,
    tmp_path: Path,
    over: Over,
) -> AsyncIterator[Served]:
    """The test's Postgres database (emptied), or a migrated SQLite file."""
    engine = db
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'analytics.db'}"
        settings = settings.model_copy(update={"database_url": url})
        engine = create_engine(url)
        await migrate(engine)
    try:
        with serve_in_thread(create_app(settings)) as base:
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                yield Served(base, client, engine, over(engine))
    finally:
        if request.param == "sqlite":
            await engine.dispose()


def at(day: date, hour: int = 12, second: float = 0.0) -> float:
    return datetime.combine(day, time(hour), UTC).timestamp() + second


def row(
    source: uuid.UUID,
    created_at: float,
    origin: str | None,
    ms: float | None = None,
    code: str | None = None,
    cost: tuple[str, str] | None = None,
    replay: str | None = None,
) -> RunDataRequestRecord:
    timed = ms is not None
    return RunDataRequestRecord(
        run_data_request_id=uuid.uuid4(),
        run_id=uuid.uuid4(),
        data_object_id=uuid.uuid4() if origin else None,
        data_source_id=source,
        data_origin=origin,
        start_time=created_at - 1 if timed else None,
        end_time=created_at - 1 + ms / 1000 if ms is not None else None,
        error=None if code is None else {"code": code, "message": "m", "upstream_status": 503},
        created_at=created_at,
        cost_amount=None if cost is None else cost[0],
        cost_currency=None if cost is None else cost[1],
        replay=replay,
    )


# The figures, computed from the rows themselves.


def _day(r: RunDataRequestRecord) -> date:
    return datetime.fromtimestamp(r.created_at, UTC).date()


def _timed(rows: Iterable[RunDataRequestRecord]) -> list[RunDataRequestRecord]:
    return [r for r in rows if r.start_time is not None]


def _ms(r: RunDataRequestRecord) -> float:
    assert r.start_time is not None and r.end_time is not None
    return (r.end_time - r.start_time) * 1000


def _hit_ratio(rows: list[RunDataRequestRecord]) -> float:
    hits = sum(r.data_origin == "CACHE" and r.replay is None for r in rows)
    misses = sum(r.data_origin == "REQUEST" for r in rows)
    return 100 * hits / (hits + misses) if hits + misses else 0.0


def _error_rate(rows: list[RunDataRequestRecord]) -> float:
    timed = _timed(rows)
    return 100 * sum(r.error is not None for r in timed) / len(timed) if timed else 0.0


def _avg_ms(rows: list[RunDataRequestRecord]) -> float:
    timed = _timed(rows)
    return statistics.fmean(_ms(r) for r in timed) if timed else 0.0


def _spend(rows: list[RunDataRequestRecord]) -> dict[str, Decimal]:
    spent: dict[str, Decimal] = {}
    for r in rows:
        if r.cost_amount is not None:
            assert r.cost_currency is not None
            spent[r.cost_currency] = spent.get(r.cost_currency, Decimal(0)) + Decimal(r.cost_amount)
    return spent


def _amounts(answer: list[dict[str, str]]) -> dict[str, Decimal]:
    return {a["currency"]: Decimal(a["amount"]) for a in answer}


def _series(answer: dict[str, Any], name: str) -> dict[date, float]:
    return {date.fromisoformat(p["date"]): p["value"] for p in answer[name]}


async def test_analytics_match_the_rows_written(served: Served) -> None:
    today = datetime.now(UTC).date()
    yesterday, long_ago = today - timedelta(days=1), today - timedelta(days=40)
    a = await served.source(
        f"a_{uuid.uuid4().hex[:8]}", PROJECT, {"amount": "0.35", "currency": "USD"}
    )
    b = await served.source(f"b_{uuid.uuid4().hex[:8]}", PROJECT, None)
    c = await served.source(f"c_{uuid.uuid4().hex[:8]}", OTHER_PROJECT, None)
    g = await served.source(f"g_{uuid.uuid4().hex[:8]}", None, None)
    usd, eur = ("0.35", "USD"), ("2", "EUR")
    rows = [
        *(row(a, at(today, 9 + i), "CACHE") for i in range(3)),
        row(a, at(today, 0, 0.5), "CACHE"),  # the first second of today, UTC
        row(a, at(today), "REQUEST", ms=100, cost=usd),
        row(a, at(today), "REQUEST", ms=300, cost=usd),
        row(a, at(today), "REQUEST", ms=1000, code="HTTP_ERROR", cost=usd),
        row(a, at(today), None, code="MISSING_PARAMS"),
        row(a, at(today), "CACHE", replay="as_of"),
        row(a, at(today), "REQUEST", ms=400, cost=usd, replay="run_id"),  # a hybrid's fresh call
        row(a, at(yesterday, 23, 3599.5), "REQUEST", ms=50, cost=usd),  # its last second
        row(a, at(yesterday), "CACHE"),
        *(row(a, at(long_ago), "CACHE") for _ in range(5)),
        *(row(b, at(today), "REQUEST", ms=200, cost=eur) for _ in range(2)),
        row(b, at(today), "REQUEST", ms=5000, code="TIMEOUT"),
        *(row(c, at(today), "CACHE") for _ in range(4)),
        row(g, at(today), "CACHE"),
        row(g, at(today), "REQUEST", ms=10),
    ]
    segment = b"".join(encode(r) for r in rows)
    sink = sink_for(served.database, batch_size=4)
    await sink.write(segment)
    await sink.write(segment)  # replayed after a crash: counted once

    def of(source: uuid.UUID, *days: date) -> list[RunDataRequestRecord]:
        return [r for r in rows if r.data_source_id == source and (not days or _day(r) in days)]

    project = {"project_id": str(PROJECT)}
    window = (today - timedelta(days=29), today)
    usage = await served.get(f"/data-sources/{a}/usage", **project)
    assert (usage["start_date"], usage["end_date"]) == tuple(d.isoformat() for d in window)
    requests = _series(usage, "requests_by_date")
    assert len(requests) == 30 and sum(requests.values()) == len(of(a, today, yesterday))
    assert requests[today] == len(of(a, today)) and requests[yesterday] == len(of(a, yesterday))
    assert _amounts(usage["spend"]) == _spend(of(a, today, yesterday))
    hits = [r for r in of(a, today, yesterday) if r.data_origin == "CACHE" and r.replay is None]
    assert _amounts(usage["spend_saved"]) == {"USD": Decimal("0.35") * len(hits)}
    assert usage["replays"] == 2

    metrics = await served.get(f"/data-sources/{a}/metrics", **project)
    latency, errors = (
        _series(metrics, "avg_response_time_by_date"),
        _series(metrics, "error_rate_by_date"),
    )
    for day in (today, yesterday):
        assert latency[day] == pytest.approx(_avg_ms(of(a, day)), rel=1e-3)
        assert errors[day] == pytest.approx(_error_rate(of(a, day)), abs=0.01)
    assert latency[today - timedelta(days=2)] == errors[today - timedelta(days=2)] == 0
    assert metrics["errors_by_code"] == {"HTTP_ERROR": 1, "MISSING_PARAMS": 1}
    exact = sorted(_ms(r) for r in _timed(of(a, today, yesterday)))
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        nearest = exact[math.ceil(q * len(exact)) - 1]
        assert abs(metrics["latency_ms"][name] - nearest) <= 0.25 * nearest

    stats = await served.get(f"/data-sources/{a}/cache-stats", **project)
    ratio = _series(stats, "cache_hit_ratio_by_date")
    for day in (today, yesterday):
        assert ratio[day] == pytest.approx(_hit_ratio(of(a, day)), abs=0.01)

    # A window of the past: the old rows, and nothing of today.
    old = await served.get(
        f"/data-sources/{a}/usage",
        start_date=long_ago.isoformat(),
        end_date=long_ago.isoformat(),
        **project,
    )
    assert _series(old, "requests_by_date") == {long_ago: len(of(a, long_ago))}

    summary = await served.get("/analytics/summary", **project)
    mine = of(a, today, yesterday) + of(b, today)
    assert summary["requests"] == len(mine)
    assert summary["hit_rate"] == pytest.approx(_hit_ratio(mine), abs=0.01)
    assert summary["error_rate"] == pytest.approx(_error_rate(mine), abs=0.01)
    assert summary["avg_latency_ms"] == pytest.approx(_avg_ms(mine), rel=1e-3)
    assert [(s["data_source_id"], s["requests"]) for s in summary["top_sources"]] == [
        (str(a), len(of(a, today, yesterday))),
        (str(b), len(of(b, today))),
    ]
    assert summary["errors_by_code"] == {"HTTP_ERROR": 1, "MISSING_PARAMS": 1, "TIMEOUT": 1}
    assert _amounts(summary["spend"]) == _spend(mine)
    assert _amounts(summary["spend_saved"]) == {"USD": Decimal("0.35") * len(hits)}
    assert summary["replays"] == 2

    other = await served.get("/analytics/summary", project_id=str(OTHER_PROJECT))
    assert [s["data_source_id"] for s in other["top_sources"]] == [str(c)]
    assert other["hit_rate"] == 100.0
    # The global namespace (no project) is a project of its own.
    everyone = await served.get("/analytics/summary")
    assert (everyone["requests"], everyone["hit_rate"]) == (2, 50.0)
    assert [s["data_source_id"] for s in everyone["top_sources"]] == [str(g)]


async def test_analytics_refuse_unknown_sources_and_bad_dates(served: Served) -> None:
    mine = await served.source(f"a_{uuid.uuid4().hex[:8]}", PROJECT, None)
    theirs = await served.source(f"c_{uuid.uuid4().hex[:8]}", OTHER_PROJECT, None)
    headers, project = admin_headers(), {"project_id": str(PROJECT)}
    for route in ("usage", "metrics", "cache-stats"):
        for sid in (theirs, uuid.uuid4()):
            answer = await served.client.get(
                f"/data-sources/{sid}/{route}", params=project, headers=headers
            )
            assert answer.status_code == 404, answer.text
        answer = await served.client.get(
            f"/data-sources/{mine}/{route}",
            params={**project, "start_date": "yesterday"},
            headers=headers,
        )
        assert answer.status_code == 422 and "start_date" in answer.text
        answer = await served.client.get(f"/data-sources/{mine}/{route}", params=project)
        assert answer.status_code == 401
    answer = await served.client.get(
        "/analytics/summary", params={"end_date": "x"}, headers=headers
    )
    assert answer.status_code == 422 and "end_date" in answer.text


async def test_stats_prints_the_four_figures_of_a_running_broker(served: Served) -> None:
    today = datetime.now(UTC).date()
    name = f"stats_{uuid.uuid4().hex[:8]}"
    sid = await served.source(name, PROJECT, None)
    rows = [
        *(row(sid, at(today), "CACHE") for _ in range(3)),
        row(sid, at(today), "REQUEST", ms=120),
        row(sid, at(today), "REQUEST", ms=380, code="HTTP_ERROR"),
    ]
    await sink_for(served.database, batch_size=100).write(b"".join(encode(r) for r in rows))

    def stats(*args: str, token: str = ADMIN_TOKEN) -> Any:
        env = {"DATABROKER_ADMIN_TOKEN": token}
        return CliRunner().invoke(main, ["stats", "--url", served.url, *args], env=env)

    done = stats("--project-id", str(PROJECT))
    assert done.exit_code == 0, done.output
    lines = done.output.splitlines()
    assert f"hit rate          {_hit_ratio(rows):.2f} %" in lines
    assert any(line.startswith(f"average latency   {_avg_ms(rows):.1f} ms") for line in lines)
    assert any(line.startswith(f"error rate        {_error_rate(rows):.2f} %") for line in lines)
    assert any(line.split() == [name, "5", f"{_hit_ratio(rows):.2f}", "%"] for line in lines)

    refused = stats("--project-id", str(PROJECT), "--start-date", "yesterday")
    assert refused.exit_code == 1 and "start_date" in refused.output
    assert stats(token="wrong").exit_code == 1


async def test_concurrent_writers_count_every_row_once(db: AsyncEngine, over: Over) -> None:
    """Sidecars flush at once into the same counters (a source's and its project's, today):
    the upserts queue on those rows in one order, and no row is lost or counted twice."""
    source, today = uuid.uuid4(), datetime.now(UTC).date()
    async with db.begin() as conn:
        await conn.execute(
            data_source.insert().values(
                data_source_id=source,
                name=f"w_{source.hex[:8]}",
                source={},
                runtime_params=[],
                variables=[],
                status="DRAFT",
                created_at=datetime.now(UTC),
                last_updated_at=datetime.now(UTC),
            )
        )
    segments = [
        b"".join(
            encode(row(source, at(today, hour), origin, ms=ms))
            for hour in range(24)
            for origin, ms in (("CACHE", None), ("REQUEST", 20.0 + hour))
        )
        for _ in range(8)
    ]
    sink = sink_for(over(db), batch_size=100)
    await asyncio.gather(*(sink.write(segment) for segment in segments))
    written = 8 * 24 * 2
    usage = analytics.usage(await _read(db, source, today), analytics.Window(today, today), None)
    assert usage["total_requests"] == written
    async with db.connect() as conn:
        whole, ranked = await rollup_reads.read_project(conn, None, today, today)
    requests = analytics.REQUESTS
    assert [c.n for c in whole if c.metric == requests] == [written]  # the tables start empty
    assert [(c.data_source_id, c.n) for c in ranked if c.metric == requests] == [(source, written)]


async def _read(db: AsyncEngine, source: uuid.UUID, day: date) -> list[analytics.Counter]:
    async with db.connect() as conn:
        return await rollup_reads.read_source(conn, source, day, day)
