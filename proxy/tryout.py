"""``POST /data-sources/{id}/test``: one real call of a source, shown as the engine's
DataSourceTestResponse, with every secret value masked.

The call takes the broker's own path — templates, ``check``, the source's auth, egress
policy, concurrency slot, timeout, retries, size cap, formats (``Broker.send``) — but
reads and writes no cache entry and journals no DataObject or audit row. As in the
engine, the answer is 200 whatever the upstream did: ``status_code`` is the upstream's
status, 408 when it timed out, 400 when the values do not fit the source, and the
broker's own status for its other refusals (403 egress denied, 502 connection failed),
with ``error`` saying why.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Mapping
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

from proxy.broker import Broker
from proxy.errors import BrokerError, ParseError, Refused, UpstreamHTTPError, UpstreamTimeout
from proxy.formats import charset_of, format_body
from proxy.masking import MIN_ECHOED, forms, mask, mask_tree
from proxy.secrets import Secrets
from proxy.source_registry import Source
from proxy.templates import check, render
from proxy.upstream import Fetched, full_url

TIMED_OUT = 408
"""The engine's status for an upstream that did not answer in time."""


class TestParams(BaseModel):
    """The body: the runtime params of the call, and variable values to use instead of
    the stored ones (strings, as the engine's ``env_vars``)."""

    __test__ = False  # not a pytest class, whatever its name
    model_config = ConfigDict(extra="forbid")
    params: dict[str, Any] | None = None
    env_vars: dict[str, str] | None = Field(default=None, repr=False)


def with_overrides(source: Source, env_vars: Mapping[str, str]) -> Source:
    """``source`` with ``env_vars`` in place of its stored values; Refused for a name
    that is not one of its variables (it would silently change nothing)."""
    undeclared = sorted(set(env_vars) - set(source.compiled.variables))
    if undeclared:
        raise Refused(
            f"not variables of this data source: {', '.join(undeclared)}", names=undeclared
        )
    return dataclasses.replace(source, values=Secrets({**source.values, **env_vars}))


def _headers(pairs: Any, secrets: list[str], shortest: int = 1) -> dict[str, str]:
    shown: dict[str, str] = {}
    for name, value in pairs:
        value = mask(value, secrets, shortest)
        shown[name] = f"{shown[name]}, {value}" if name in shown else value
    return shown


def _body(fetched: Fetched, source: Source) -> tuple[Any, str | None]:
    """The formatted value, or the body as text with the parse error."""
    try:
        value_json = format_body(
            fetched.content, source.http.response_type, charset_of(fetched.content_type)
        )
    except ParseError as exc:
        return fetched.content.decode("utf-8", "replace"), f"{exc.code}: {exc.message}"
    return orjson.loads(value_json), None


async def run(broker: Broker, source: Source, params: Mapping[str, Any]) -> dict[str, Any]:
    """Call the source once with ``params``; the DataSourceTestResponse, secrets masked."""
    stored = [*source.values.values(), *source.credentials.values()]
    secrets = forms(stored)
    # The auth sent (a token, a basic pair's base64): an upstream may echo its headers.
    applied: list[str] = []
    answer: dict[str, Any] = {
        "test_id": str(uuid.uuid4()),
        "request_url": None,
        "request_headers": None,
        "status_code": None,
        "response_time_ms": 0.0,
        "response_body": None,
        "response_headers": None,
        "error": None,
    }
    started = time.perf_counter()
    try:
        check(source.compiled, params, source.values)
        rendered = render(source.compiled, params, source.values)
        answer["request_url"] = mask(str(full_url(rendered)), secrets)
        answer["request_headers"] = _headers(rendered.headers, secrets)
        fetched = await broker.send(source, rendered, applied)
    except UpstreamTimeout as exc:
        answer["status_code"], answer["error"] = TIMED_OUT, f"Request timed out: {exc.message}"
    except UpstreamHTTPError as exc:
        answer["status_code"], answer["error"] = exc.upstream_status, exc.message
    except BrokerError as exc:
        answer["status_code"], answer["error"] = exc.status, f"{exc.code}: {exc.message}"
    else:
        secrets = forms([*stored, *applied])
        body, error = _body(fetched, source)
        headers = fetched.headers.multi_items() if fetched.headers is not None else []
        answer |= {
            "status_code": fetched.status,
            "response_body": mask_tree(body, secrets, MIN_ECHOED),
            "response_headers": _headers(headers, secrets, MIN_ECHOED),
            "error": error,
        }
    answer["response_time_ms"] = (time.perf_counter() - started) * 1000
    if answer["error"] is not None:
        answer["error"] = mask(answer["error"], secrets, MIN_ECHOED)
    return answer
