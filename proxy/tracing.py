"""Traces of broker requests, when the standard ``OTEL_*`` variables configure an exporter.

What the request path calls. Until ``install`` ran (``serve`` does, in each worker,
when ``configured``), each call is a check of one module global returning a shared
no-op, and nothing of OpenTelemetry is imported: ``proxy.otel``, which imports it
(the ``otel`` extra), is loaded by ``install`` only.

The tree: ``databroker.request`` (from the caller's ``traceparent`` when it sent
one) with ``replay``, ``cache``, ``lock``, ``admission``, ``upstream`` (whose
``traceparent`` goes to the upstream), ``cache.store`` and ``outbox`` children. Attributes say the source's
name, the origin, the cache entry's age and the error code: never a parameter's
or a variable's value, never a URL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import TYPE_CHECKING, Any, TypeVar

from proxy.templates import RenderedRequest

if TYPE_CHECKING:
    from proxy.otel import Tracer

T = TypeVar("T")
Span = Any
"""An OpenTelemetry span, or None when traces are off."""

_NOOP: AbstractContextManager[None] = contextlib.nullcontext()
_tracer: Tracer | None = None


def configured(environ: Mapping[str, str] = os.environ) -> bool:
    """An exporter is named (``OTEL_TRACES_EXPORTER`` other than ``none``) or an OTLP
    endpoint is given, and the SDK is not disabled."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER")
    if exporter is not None:
        return exporter.strip().lower() not in ("", "none")
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def install(provider: Any = None) -> None:
    """Trace from now on: to ``provider`` (an SDK TracerProvider), else to the exporters
    the environment configures. ImportError without the ``otel`` extra; StartupError
    for an exporter that is not shipped."""
    from proxy.otel import Tracer, provider_from_environment

    global _tracer
    _tracer = Tracer(provider or provider_from_environment())


def check() -> None:
    """What ``install`` would refuse, found before serving: ImportError without the
    ``otel`` extra, StartupError for an exporter that is not shipped."""
    from proxy.otel import exporters

    exporters()


def uninstall() -> None:
    global _tracer
    _tracer = None


def request(headers: Iterable[tuple[bytes, bytes]]) -> AbstractContextManager[Span]:
    """The broker request's span, the child of the caller's ``traceparent`` if any."""
    return _NOOP if _tracer is None else _tracer.request(headers)


def span(name: str) -> AbstractContextManager[Span]:
    """A child of the current span, current while it lasts."""
    return _NOOP if _tracer is None else _tracer.span(name)


def annotate(current: Span, **attributes: str | int | float | bool | None) -> None:
    """Set the attributes that are not None on ``current`` (a span, or None when off)."""
    if current is not None:
        current.set_attributes({k: v for k, v in attributes.items() if v is not None})


def failed(current: Span, code: str) -> None:
    """Mark ``current`` failed with the contract's error code."""
    if current is not None and _tracer is not None:
        _tracer.failed(current, code)


def waited(name: str, manager: AbstractAsyncContextManager[T]) -> AbstractAsyncContextManager[T]:
    """``manager`` entered inside a span that ends once it is entered: the wait for a
    lock, not the time it is held."""
    return manager if _tracer is None else _waited(name, manager)


@contextlib.asynccontextmanager
async def _waited(name: str, manager: AbstractAsyncContextManager[T]) -> AsyncIterator[T]:
    async with contextlib.AsyncExitStack() as stack:
        with span(name):
            value = await stack.enter_async_context(manager)
        yield value


def propagate(rendered: RenderedRequest) -> RenderedRequest:
    """``rendered`` with the current span's ``traceparent`` (W3C trace context only:
    no baggage leaves for a vendor)."""
    if _tracer is None:
        return rendered
    return dataclasses.replace(rendered, headers=(*rendered.headers, *_tracer.headers()))
