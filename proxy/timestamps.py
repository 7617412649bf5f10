"""Timestamps as the API writes them: ISO 8601 in UTC, always with the offset."""

from __future__ import annotations

from datetime import UTC, datetime


def iso_utc(moment: datetime) -> str:
    """SQLite gives back naive datetimes for what was stored in UTC: they are read as UTC,
    so the engine's SDK never meets a timestamp without an offset."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat()
