"""Prometheus metrics, served on ``GET /metrics``. Labels never carry values or secrets."""

from __future__ import annotations

from dataclasses import dataclass
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
HOT_BYTES = Gauge("databroker_hot_bytes", "Bytes held by hot entries.")
HOT_LIVE = Gauge(
    "databroker_hot_live", "1 while the invalidation link is up and hot entries are in use."
)


@cache
def requests_counter(origin: str, code: str) -> Counter:
    """The child of BROKER_REQUESTS for these labels, looked up once (labels() locks)."""
    return BROKER_REQUESTS.labels(origin=origin, code=code)


SPEND = Counter(
    "databroker_spend",
    "What upstream calls cost (each source's cost per call), by source and currency.",
    ["source", "currency"],
)
VENDOR_REFUSALS = Counter(
    "databroker_vendor_refusals",
    "Upstream calls not made: BUDGET_EXHAUSTED, RATE_LIMITED, CIRCUIT_OPEN, SOURCE_PAUSED.",
    ["source", "code"],
)
RATE_LIMIT_WAITS = Counter(
    "databroker_rate_limit_waits",
    "Upstream calls that waited for their rate-limit turn.",
    ["source"],
)
RATE_LIMIT_WAIT_SECONDS = Counter(
    "databroker_rate_limit_wait_seconds",
    "Seconds upstream calls waited for their turn.",
    ["source"],
)
CIRCUIT_STATE = Gauge(
    "databroker_circuit_state",
    "A source's circuit breaker as this sidecar last saw it: 0 closed, 1 open, 2 half-open.",
    ["source"],
)
BUDGET_REMAINING = Gauge(
    "databroker_budget_remaining",
    "What a source may still spend in its budget period, as this sidecar last saw it.",
    ["source", "currency"],
)


@dataclass(frozen=True, slots=True)
class VendorMetrics:
    """One source's vendor-protection metrics; labels are the source's name only."""

    source: str
    waits: Counter
    wait_seconds: Counter
    breaker: Gauge

    def refusals(self, code: str) -> Counter:
        return VENDOR_REFUSALS.labels(source=self.source, code=code)

    def budget_remaining(self, currency: str) -> Gauge:
        return BUDGET_REMAINING.labels(source=self.source, currency=currency)

    def spend(self, currency: str) -> Counter:
        return SPEND.labels(source=self.source, currency=currency)


@cache
def vendor_metrics(source: str) -> VendorMetrics:
    return VendorMetrics(
        source,
        RATE_LIMIT_WAITS.labels(source=source),
        RATE_LIMIT_WAIT_SECONDS.labels(source=source),
        CIRCUIT_STATE.labels(source=source),
    )
