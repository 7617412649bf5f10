"""deploy/monitoring: the Grafana dashboard and the Prometheus alert rules query only
metrics, and labels, that a running broker's ``/metrics`` exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.responses import Response

from tests.conftest import Broker
from tests.servers import Upstream

MONITORING = Path(__file__).resolve().parent.parent / "deploy" / "monitoring"
# Labels Prometheus adds to every series it scrapes from a pod, and the histogram's own.
SCRAPE_LABELS = {"namespace", "pod", "le"}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _exposed(metrics: str) -> dict[str, set[str]]:
    """Every series name /metrics exposes, with its label names."""
    exposed: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics):
        labels = {name for sample in family.samples for name in sample.labels}
        for suffix in SUFFIXES.get(family.type, ("",)):
            exposed[family.name + suffix] = labels - {"le"}
    return exposed


def _queried(expr: str) -> set[str]:
    return set(re.findall(r"\bdatabroker_[a-z_]+\b", expr))


def _label_names(expr: str) -> set[str]:
    """Label names in ``by (…)`` / ``on (…)`` clauses and ``{…}`` selectors."""
    names = set()
    for group in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", expr):
        names |= {n.strip() for n in group.split(",") if n.strip()}
    for selector in re.findall(r"\{([^}]*)\}", expr):
        names |= set(re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", selector))
    return names


async def _empty_json(_: Request) -> Response:
    return Response(b"{}")


def test_the_alert_rules_are_well_formed() -> None:
    rules = _rules()
    assert {r["alert"] for r in rules} >= {
        "DatabrokerOutboxBehind",
        "DatabrokerHighErrorRate",
        "DatabrokerDependencyDown",
        "DatabrokerCircuitOpen",
    }
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]


async def test_every_queried_metric_and_label_is_exposed(
    shared_broker: Broker, upstream: Upstream
) -> None:
    # Requests answered, so that labelled families have series that show their labels.
    url = upstream.on("/monitoring", _empty_json)
    spec = {"name": "monitoring", "source": {"url": url}, "caching": {"enabled": True}}
    await shared_broker.register(spec)
    assert (await shared_broker.call("monitoring")).status_code == 200
    await shared_broker.call("no_such_source_for_monitoring")
    exposed = _exposed((await shared_broker.client.get("/metrics")).text)
    exprs = _dashboard_exprs() + [rule["expr"] for rule in _rules()]
    queried = set().union(*(_queried(e) for e in exprs))
    assert {
        "databroker_outbox_oldest_age_seconds",
        "databroker_requests_total",
        "databroker_request_duration_seconds_bucket",
        "databroker_upstream_responses_total",
        "databroker_upstream_retries_total",
        "databroker_outbox_write_failures_total",
        "databroker_build_info",
        "databroker_circuit_state",
    } <= queried
    assert queried - exposed.keys() == set()
    known = SCRAPE_LABELS.union(*exposed.values())
    for expr in exprs:
        assert _label_names(expr) <= known, expr
