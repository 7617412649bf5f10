"""The wire shapes of ``POST /internal/data-broker``: parse the request, assemble answers.

Pure functions over bytes. Answers embed the value's JSON as an
``orjson.Fragment``, so a cached value is copied into the response unchanged.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.errors import BrokerError, InvalidRequest
from proxy.types import Origin

MAX_NAME_LENGTH = 200
FIELDS = frozenset({"data_source_name", "configured_params", "run_id", "project_id"})


@dataclass(frozen=True, slots=True)
class BrokerRequest:
    data_source_name: str
    configured_params: dict[str, Any]
    run_id: uuid.UUID
    project_id: uuid.UUID | None


def _uuid(value: Any, field: str) -> uuid.UUID:
    if not isinstance(value, str):
        raise InvalidRequest(f"{field} must be a UUID string", field=field)
    try:
        return uuid.UUID(value)
    except ValueError as exc:
        raise InvalidRequest(f"{field} is not a UUID", field=field) from exc


def parse_request(body: bytes) -> BrokerRequest:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest("body is not valid JSON") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("body must be a JSON object")
    unknown = sorted(data.keys() - FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown fields: {', '.join(unknown)}", fields=unknown)
    missing = sorted({"data_source_name", "configured_params", "run_id"} - data.keys())
    if missing:
        raise InvalidRequest(f"missing fields: {', '.join(missing)}", fields=missing)
    name = data["data_source_name"]
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LENGTH:
        raise InvalidRequest(
            "data_source_name must be a non-empty string", field="data_source_name"
        )
    params = data["configured_params"]
    if not isinstance(params, dict):
        raise InvalidRequest("configured_params must be an object", field="configured_params")
    project = data.get("project_id")
    return BrokerRequest(
        data_source_name=name,
        configured_params=params,
        run_id=_uuid(data["run_id"], "run_id"),
        project_id=None if project is None else _uuid(project, "project_id"),
    )


def success(
    *,
    data_object_id: str,
    origin: Origin,
    key: str,
    value_json: bytes,
    start_time: float | None,
    end_time: float | None,
    stale: bool = False,
) -> bytes:
    """The answer; ``stale`` marks a cached value served past its TTL because the upstream failed."""
    body: dict[str, Any] = {
        "data_object_id": data_object_id,
        "origin": origin,
        "key": key,
        "value": orjson.Fragment(value_json),
        "start_time": start_time,
        "end_time": end_time,
        "error": None,
    }
    if stale:
        body["stale"] = True
    return orjson.dumps(body)


def failure(
    error: BrokerError,
    *,
    data_object_id: str | None = None,
    origin: Origin | None = None,
    key: str | None = None,
    start_time: float | None = None,
    end_time: float | None = None,
) -> bytes:
    return orjson.dumps(
        {
            "data_object_id": data_object_id,
            "origin": origin,
            "key": key,
            "value": None,
            "start_time": start_time,
            "end_time": end_time,
            "error": error.to_dict(),
        }
    )
