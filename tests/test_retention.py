"""proxy.retention: which rows of which source go, from the source's and the global retention."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from proxy.retention import Cut, SourceRetention, cuts, retention

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def test_a_source_retention_wins_over_the_default() -> None:
    assert retention(30, 400) == 30
    assert retention(None, 400) == 400
    assert retention(None, None) is None


def test_cuts_skip_sources_kept_forever_and_age_from_now() -> None:
    kept, own, default = (uuid.uuid4() for _ in range(3))
    sources = [
        SourceRetention(kept, "kept", None),
        SourceRetention(own, "own", 30),
        SourceRetention(default, "by default", None),
    ]
    assert cuts(sources[:1], None, NOW) == []
    assert cuts(sources, 7, NOW) == [
        Cut(default, "by default", 7, NOW - timedelta(days=7)),
        Cut(kept, "kept", 7, NOW - timedelta(days=7)),
        Cut(own, "own", 30, NOW - timedelta(days=30)),
    ]
    assert cuts(sources, None, NOW) == [Cut(own, "own", 30, NOW - timedelta(days=30))]
