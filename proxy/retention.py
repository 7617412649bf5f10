"""How long a data source's rows are kept: pure decisions, no I/O, the clock given.

A source's ``retention_days`` wins; without one, ``DATABROKER_RETENTION_DAYS``;
without that, rows are kept forever (lenders keep application records for 25
months under Reg B: nothing is deleted unless someone chose a period). Each row
is aged by its own ``created_at``: an old DataObject goes even if a recent hit
still named it, and that hit's audit row stays until it is old itself.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True, slots=True)
class SourceRetention:
    """What the pruner knows of a source: the row's fields it reads."""

    data_source_id: uuid.UUID
    name: str
    retention_days: int | None


@dataclass(frozen=True, slots=True)
class Cut:
    """One source's rows created before ``before`` are to go."""

    data_source_id: uuid.UUID
    name: str
    days: int
    before: datetime


def retention(source_days: int | None, default_days: int | None) -> int | None:
    """The days a source's rows are kept; ``None``: forever."""
    return source_days if source_days is not None else default_days


def cuts(sources: Iterable[SourceRetention], default_days: int | None, now: datetime) -> list[Cut]:
    """The cut of every source whose rows are not kept forever, in name order."""
    found = []
    for source in sources:
        days = retention(source.retention_days, default_days)
        if days is not None:
            found.append(Cut(source.data_source_id, source.name, days, now - timedelta(days=days)))
    return sorted(found, key=lambda cut: (cut.name, str(cut.data_source_id)))
