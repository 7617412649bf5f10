"""Prometheus metrics, served on ``GET /metrics``. Labels never carry values or secrets."""

from __future__ import annotations

from functools import cache

from prometheus_client import Counter, Gauge, Histogram

BROKER_REQUESTS = Counter(
    "databroker_requests_total",
    "Broker requests answered, by origin (CACHE, REQUEST, NONE) and error code (OK if none).",
    ["origin", "code"],
)
UPSTREAM_SECONDS = Histogram(
    "databroker_upstream_seconds",
    "Time spent calling upstream APIs, retries included.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
OUTBOX_BACKLOG_BYTES = Gauge(
    "databroker_outbox_backlog_bytes", "Bytes journaled in the outbox and not yet in the database."
)
RECORDS_WRITTEN = Counter(
    "databroker_records_written_total", "DataObjects and audit rows committed to the database."
)
HOT_HITS = Counter(
    "databroker_hot_hits_total", "Cache hits answered from hot entries, without a Redis round trip."
)
HOT_INVALIDATIONS = Counter(
    "databroker_hot_invalidations_total",
    "Invalidations received from Redis (one per name; a flush counts one).",
)
ROWS_PRUNED = Counter(
    "databroker_rows_pruned_total",
    "DataObjects and audit rows deleted for being older than their retention, by table.",
    ["table"],
)
DEPENDENCY_UP = Gauge(
    "databroker_dependency_up",
    "1 if the dependency (redis, database) answered its last background check, else 0.",
    ["dependency"],
)
HOT_BYTES = Gauge("databroker_hot_bytes", "Bytes held by hot entries.")
HOT_LIVE = Gauge(
    "databroker_hot_live", "1 while the invalidation link is up and hot entries are in use."
)


@cache
def requests_counter(origin: str, code: str) -> Counter:
    """The child of BROKER_REQUESTS for these labels, looked up once (labels() locks)."""
    return BROKER_REQUESTS.labels(origin=origin, code=code)
