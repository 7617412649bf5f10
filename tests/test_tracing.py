"""Traces: the span tree of a miss, a hit and a failure in the SDK's in-memory exporter,
``traceparent`` in and out (at a real upstream), no value in any attribute; and nothing of
OpenTelemetry imported when no ``OTEL_*`` variable configures an exporter."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import pytest
from click.testing import CliRunner
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from proxy import tracing
from proxy.cli import main
from tests.conftest import Broker
from tests.harness import BROKER_PATH, broker_request
from tests.servers import Upstream

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
PARAM = "param-value-canary-91c2"


def request_tree(
    finished: Sequence[ReadableSpan],
) -> tuple[ReadableSpan, dict[str, list[ReadableSpan]]]:
    """The one broker request among ``finished``, and its children by name."""
    [root] = [span for span in finished if span.name == "databroker.request"]
    assert root.context is not None
    children: dict[str, list[ReadableSpan]] = {}
    for span in finished:
        if span.parent is not None and span.parent.span_id == root.context.span_id:
            children.setdefault(span.name, []).append(span)
    return root, children


def no_value_in(finished: Sequence[ReadableSpan]) -> None:
    for span in finished:
        shown = repr(dict(span.attributes or {})) + repr(
            [dict(e.attributes or {}) for e in span.events]
        )
        assert PARAM not in shown and "127.0.0.1" not in shown, span.name


async def test_a_miss_then_a_hit_make_their_trees(
    broker: Broker, upstream: Upstream, spans: InMemorySpanExporter
) -> None:
    upstream.answer("/traced", b'{"v": 1}')
    spec = {
        "name": "traced",
        "source": {"url": f"{upstream.url}/traced?x={{{{ x }}}}", "response_type": "JSON"},
        "caching": {"enabled": True, "ttl": 60},
    }
    await broker.register(spec)
    spans.clear()  # the admin routes are not traced; nothing else is expected here

    body = broker_request("traced", {"x": PARAM})
    miss = await broker.client.post(BROKER_PATH, json=body, headers=TRACEPARENT)
    assert miss.json()["origin"] == "REQUEST", miss.text
    root, children = request_tree(spans.get_finished_spans())
    assert sorted((name, len(found)) for name, found in children.items()) == [
        ("admission", 1),  # budget, rate limit, breaker
        ("cache", 1),
        ("cache.store", 1),
        ("lock", 1),
        ("outbox", 2),  # the DataObject, the audit row
        ("upstream", 1),
    ]
    # The caller's trace goes on: our request span is the child of the caller's span...
    assert root.parent is not None and root.parent.is_remote
    assert (f"{root.parent.trace_id:032x}", f"{root.parent.span_id:016x}") == (
        CALLER_TRACE,
        CALLER_SPAN,
    )
    assert root.attributes is not None
    assert dict(root.attributes) == {
        "databroker.source": "traced",
        "databroker.origin": "REQUEST",
        "http.response.status_code": 200,
    }
    assert root.status.status_code is StatusCode.UNSET
    assert dict(children["cache"][0].attributes or {}) == {"cache.hit": False}
    # ...and the upstream's request is the child of our upstream span.
    [upstream_span] = children["upstream"]
    assert upstream_span.context is not None
    [received] = [r for r in upstream.received if r["path"] == "/traced"]
    assert received["headers"]["traceparent"] == (
        f"00-{CALLER_TRACE}-{upstream_span.context.span_id:016x}-01"
    )

    spans.clear()
    hit = await broker.client.post(BROKER_PATH, json=body)  # no traceparent: a new trace
    assert hit.json()["origin"] == "CACHE", hit.text
    root, children = request_tree(spans.get_finished_spans())
    assert root.parent is None
    assert sorted(children) == ["cache", "outbox"]
    cache = dict(children["cache"][0].attributes or {})
    assert cache["cache.hit"] is True and 0 <= float(cache["cache.age_s"]) < 60  # type: ignore[arg-type]
    assert dict(root.attributes or {})["databroker.origin"] == "CACHE"
    no_value_in(spans.get_finished_spans())


async def test_failures_carry_their_error_code(
    broker: Broker, upstream: Upstream, spans: InMemorySpanExporter
) -> None:
    upstream.answer("/down", b"{}", status=500)
    await broker.register({"name": "down", "source": {"url": f"{upstream.url}/down?x={{{{ x }}}}"}})
    spans.clear()

    failed = await broker.client.post(BROKER_PATH, json=broker_request("down", {"x": PARAM}))
    assert failed.json()["error"]["code"] == "HTTP_ERROR", failed.text
    root, children = request_tree(spans.get_finished_spans())
    attributes: dict[str, Any] = dict(root.attributes or {})
    assert attributes["databroker.error_code"] == "HTTP_ERROR"
    assert root.status.status_code is StatusCode.ERROR
    assert children["upstream"][0].status.status_code is StatusCode.ERROR
    no_value_in(spans.get_finished_spans())

    spans.clear()
    replay = {"as_of": "2000-01-01T00:00:00Z"}  # nothing stored then: strict, a miss
    missed = await broker.client.post(
        BROKER_PATH, json=broker_request("down", {"x": PARAM}, replay=replay)
    )
    assert missed.json()["error"]["code"] == "REPLAY_MISS", missed.text
    root, children = request_tree(spans.get_finished_spans())
    assert sorted(children) == ["outbox", "replay"]
    assert dict(root.attributes or {})["databroker.error_code"] == "REPLAY_MISS"

    spans.clear()
    await broker.client.post(BROKER_PATH, json=broker_request("nobody", {"x": PARAM}))
    root, children = request_tree(spans.get_finished_spans())
    assert dict(root.attributes or {})["databroker.error_code"] == "DATA_SOURCE_NOT_FOUND"
    assert "databroker.source" not in dict(root.attributes or {}) and children == {}


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x"}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_traces_are_on_only_when_an_exporter_is_configured(
    environ: dict[str, str], on: bool
) -> None:
    assert tracing.configured(environ) is on


def test_a_broker_without_traces_needs_nothing_of_opentelemetry() -> None:
    """Without the extra (OpenTelemetry made unimportable here) the broker builds as ever,
    and with it, unconfigured, ``proxy.otel`` is never loaded: every call is the no-op.
    (redis-py 7 imports the SDK's metrics module itself where it is installed.)"""
    script = (
        "import sys; sys.modules['opentelemetry'] = None;"
        "import proxy.cli, proxy.app; from proxy import tracing; proxy.app.create_app();"
        "assert 'proxy.otel' not in sys.modules;"
        "assert tracing.span('cache') is tracing.request([]) is tracing._NOOP"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_serve_refuses_an_exporter_that_is_not_shipped() -> None:
    result = CliRunner().invoke(main, ["serve"], env={"OTEL_TRACES_EXPORTER": "zipkin"})
    assert result.exit_code == 2
    assert "OTEL_TRACES_EXPORTER=zipkin is not supported" in result.output
