"""Everything that imports OpenTelemetry (the ``otel`` extra): loaded by
``proxy.tracing.install`` only, so a broker without traces never imports it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from importlib.metadata import version

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from proxy.errors import BrokerError, StartupError

# Trace context only, whatever OTEL_PROPAGATORS says: baggage from the caller is not
# forwarded to a vendor.
_PROPAGATOR = TraceContextTextMapPropagator()
_INCOMING = frozenset({b"traceparent", b"tracestate"})


def exporters() -> list[Callable[[], SpanExporter]]:
    """A factory for each exporter ``OTEL_TRACES_EXPORTER`` names (default otlp);
    StartupError for one that is not shipped: checked by ``serve`` before it starts."""
    factories: list[Callable[[], SpanExporter]] = []
    names = os.environ.get("OTEL_TRACES_EXPORTER", "otlp")
    for name in filter(None, (part.strip().lower() for part in names.split(","))):
        if name == "console":
            factories.append(ConsoleSpanExporter)
        elif name == "otlp":
            protocol = os.environ.get(
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            )
            if protocol != "http/protobuf":
                raise StartupError(
                    f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol} is not supported: http/protobuf"
                )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            factories.append(OTLPSpanExporter)  # endpoint, headers...: from OTEL_EXPORTER_OTLP_*
        else:
            raise StartupError(f"OTEL_TRACES_EXPORTER={name} is not supported: otlp or console")
    return factories


def provider_from_environment() -> TracerProvider:
    """A provider exporting in batches (``OTEL_BSP_*``) to ``exporters()``; ``service.name``
    databroker unless ``OTEL_SERVICE_NAME`` or ``OTEL_RESOURCE_ATTRIBUTES`` say otherwise."""
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "databroker"}))
    provider = TracerProvider(resource=resource)
    for exporter in exporters():
        provider.add_span_processor(BatchSpanProcessor(exporter()))
    return provider


class Tracer:
    def __init__(self, provider: trace.TracerProvider) -> None:
        self._tracer = provider.get_tracer("databroker", version("databroker"))

    def request(self, headers: Iterable[tuple[bytes, bytes]]) -> AbstractContextManager[Span]:
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k in _INCOMING}
        return self._span("databroker.request", SpanKind.SERVER, _PROPAGATOR.extract(carrier))

    def span(self, name: str) -> AbstractContextManager[Span]:
        return self._span(name, SpanKind.CLIENT if name == "upstream" else SpanKind.INTERNAL)

    @contextmanager
    def _span(self, name: str, kind: SpanKind, parent: Context | None = None) -> Iterator[Span]:
        """A current span that a failure marks with its error code only. Not the SDK's
        recorded exception: its stack trace holds the chained causes' messages, and
        httpx's quote the URL, variables and all."""
        with self._tracer.start_as_current_span(
            name, parent, kind, record_exception=False, set_status_on_exception=False
        ) as span:
            try:
                yield span
            except BaseException as exc:
                self.failed(span, exc.code if isinstance(exc, BrokerError) else type(exc).__name__)
                raise

    @staticmethod
    def failed(span: Span, code: str) -> None:
        span.set_attribute("databroker.error_code", code)
        span.set_status(Status(StatusCode.ERROR, code))

    @staticmethod
    def headers() -> Iterator[tuple[str, str]]:
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        return iter(carrier.items())
