"""How the daily rollup (``proxy.rollup``) is read: a window of days costs a few rows per
source and day, however many requests they saw."""

from __future__ import annotations

import uuid
from datetime import date
from decimal import Decimal

from sqlalchemy import Date, Select, case, func, literal, select
from sqlalchemy.ext.asyncio import AsyncConnection

from proxy.analytics import DAILY, PROJECT, Counter
from proxy.rollup import RANKED, project_key
from proxy.tables import data_source, run_data_request_daily


def source_query(
    data_source_id: uuid.UUID, start: date, end: date
) -> Select[date, str, str, int, Decimal]:
    """A source's counters of the days ``start`` to ``end``, both included: those a
    series charts (``DAILY``) per day, the others summed over the window (on ``start``)."""
    t = run_data_request_daily.c
    day = case((t.metric.in_(DAILY), t.day), else_=literal(start, Date))
    return (
        select(day, t.metric, t.label, func.sum(t.n), func.sum(t.total))
        .where(t.data_source_id == data_source_id, t.day >= start, t.day <= end)
        .group_by(day, t.metric, t.label)
    )


def project_query(
    project_id: uuid.UUID | None, start: date, end: date
) -> Select[str, str, int, Decimal]:
    """A project's counters (all its sources together) summed over the days ``start`` to
    ``end``; metrics without their ``PROJECT`` prefix."""
    t = run_data_request_daily.c
    return (
        select(func.substr(t.metric, 2), t.label, func.sum(t.n), func.sum(t.total))
        .where(
            t.data_source_id == project_key(project_id),
            t.metric.startswith(PROJECT, autoescape=True),
            t.day >= start,
            t.day <= end,
        )
        .group_by(t.metric, t.label)
    )


def ranking_query(
    project_id: uuid.UUID | None, start: date, end: date
) -> Select[uuid.UUID, str, int]:
    """Requests, hits and misses of each of the project's sources (archived ones included:
    they served) over the days ``start`` to ``end``."""
    t, s = run_data_request_daily.c, data_source.c
    in_project = s.project_id.is_(None) if project_id is None else s.project_id == project_id
    return (
        select(t.data_source_id, t.metric, func.sum(t.n))
        .join(data_source, s.data_source_id == t.data_source_id)
        .where(t.metric.in_(RANKED), t.day >= start, t.day <= end, in_project)
        .group_by(t.data_source_id, t.metric)
    )


async def read_source(
    conn: AsyncConnection, data_source_id: uuid.UUID, start: date, end: date
) -> list[Counter]:
    rows = await conn.execute(source_query(data_source_id, start, end))
    return [
        Counter(data_source_id, day, m, label, int(n), Decimal(t)) for day, m, label, n, t in rows
    ]


async def read_project(
    conn: AsyncConnection, project_id: uuid.UUID | None, start: date, end: date
) -> tuple[list[Counter], list[Counter]]:
    """The project's counters, and its sources' requests, hits and misses, summed over the
    window (``day`` is ``start`` in every one)."""
    key = project_key(project_id)
    whole = [
        Counter(key, start, m, label, int(n), Decimal(t))
        for m, label, n, t in await conn.execute(project_query(project_id, start, end))
    ]
    ranked = [
        Counter(sid, start, m, "", int(n), Decimal(0))
        for sid, m, n in await conn.execute(ranking_query(project_id, start, end))
    ]
    return whole, ranked
