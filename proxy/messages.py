"""The wire shapes of ``POST /internal/data-broker``: parse the request, assemble answers.

Pure functions over bytes. Answers embed the value's JSON as an
``orjson.Fragment``, so a cached value is copied into the response unchanged.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from proxy.errors import BrokerError, InvalidRequest, shortlist
from proxy.source_spec import MAX_NAME_LENGTH
from proxy.types import Origin

MAX_DEPTH = 64
"""Nesting a request body may have: far beyond real params, far below the recursion limits
of the stdlib ``json`` (the cache key) and of orjson's writer (254 levels)."""
REQUIRED = ("data_source_name", "configured_params", "run_id")
FIELDS = frozenset({*REQUIRED, "project_id", "max_age", "replay"})
_REQUIRED = frozenset(REQUIRED)
REPLAY_FIELDS = frozenset({"as_of", "run_id", "mode"})
REPLAY_MODES = ("strict", "hybrid")
REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": list(REQUIRED),
    "properties": {
        "data_source_name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME_LENGTH},
        "configured_params": {"type": "object", "additionalProperties": True},
        "run_id": {"type": "string", "format": "uuid"},
        "project_id": {"anyOf": [{"type": "string", "format": "uuid"}, {"type": "null"}]},
        "max_age": {"type": "number", "minimum": 0},
        "replay": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "as_of": {"type": "string", "format": "date-time"},
                "run_id": {"type": "string", "format": "uuid"},
                "mode": {"enum": list(REPLAY_MODES), "default": "strict"},
            },
            "oneOf": [{"required": ["as_of"]}, {"required": ["run_id"]}],
        },
    },
}
"""The request's shape as ``/openapi.json`` publishes it: what ``parse_request`` accepts,
from the same constants (strict JSON, which a schema cannot say, on top)."""


@dataclass(frozen=True, slots=True)
class Replay:
    """What a replayed request looks up by: exactly one of ``as_of`` (UTC) and ``run_id``."""

    as_of: datetime | None
    run_id: uuid.UUID | None
    mode: Literal["strict", "hybrid"]

    @property
    def by(self) -> str:
        """The audit row's ``replay`` column."""
        return "AS_OF" if self.as_of is not None else "RUN_ID"


@dataclass(frozen=True, slots=True)
class BrokerRequest:
    data_source_name: str
    configured_params: dict[str, Any]
    run_id: uuid.UUID
    project_id: uuid.UUID | None
    max_age: float | None = None
    """Seconds: a cache entry older than this at the request's arrival is not used."""
    replay: Replay | None = None


def _uuid(value: Any, field: str) -> uuid.UUID:
    if not isinstance(value, str):
        raise InvalidRequest(f"{field} must be a UUID string", field=field)
    try:
        return uuid.UUID(value)
    except ValueError as exc:
        raise InvalidRequest(f"{field} is not a UUID", field=field) from exc


def loads_strict(body: bytes) -> Any:
    """JSON as every route reads it; a ValueError says why, never quoting the body.

    orjson refuses what is not UTF-8, NaN and Infinity, numbers beyond a double and
    lone surrogates. On top of that: nesting past MAX_DEPTH, and duplicate keys,
    which parsers resolve differently (first or last wins), so two readers of the
    same body could disagree on what it asks for.
    """
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"body is not valid JSON ({exc.msg})") from exc
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH:  # else it cannot be that deep
        _check_depth(value)
    # The price of refusing duplicates, which orjson keeps; safe: the depth is bounded now,
    # and orjson has checked the body is UTF-8. Skipped when the colons prove there is none.
    if body.count(b":") != _members(value):
        _DUPLICATES.decode(body.decode())
    return value


def _check_depth(value: Any) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            if depth > MAX_DEPTH:
                raise ValueError(f"body is nested deeper than {MAX_DEPTH} levels")
            stack.extend((child, depth + 1) for child in item)


def _members(value: Any) -> int:
    """How many members the objects of a parsed value hold, nested ones included.

    Outside strings a JSON text has one colon per member it wrote, so when its colons
    number exactly the members parsed, no member was dropped as a repeated key (nor does
    any string hold a colon): the stdlib's second parse (7 µs of every broker request,
    hits included) is needed only otherwise.
    """
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            count += len(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def _unique_keys(pairs: list[tuple[str, Any]]) -> None:
    if len({key for key, _ in pairs}) != len(pairs):
        raise ValueError("body repeats a key in one object")


# One decoder for every request: json.loads with a hook builds a new one per call (~1.6 µs
# of a hit, python -m bench --profile).
_DUPLICATES = json.JSONDecoder(object_pairs_hook=_unique_keys)


def parse_request(body: bytes) -> BrokerRequest:
    try:
        data = loads_strict(body)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from exc
    if not isinstance(data, dict):
        raise InvalidRequest("body must be a JSON object")
    keys = data.keys()
    if not keys <= FIELDS:
        listed = shortlist(sorted(keys - FIELDS))
        raise InvalidRequest(f"unknown fields: {', '.join(listed)}", fields=listed)
    if not keys >= _REQUIRED:
        missing = sorted(_REQUIRED - keys)
        raise InvalidRequest(f"missing fields: {', '.join(missing)}", fields=missing)
    name = data["data_source_name"]
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LENGTH:
        raise InvalidRequest(
            f"data_source_name must be a string of 1 to {MAX_NAME_LENGTH} characters",
            field="data_source_name",
        )
    params = data["configured_params"]
    if not isinstance(params, dict):
        raise InvalidRequest("configured_params must be an object", field="configured_params")
    project = data.get("project_id")
    max_age = data.get("max_age")
    replay = data.get("replay")
    return BrokerRequest(
        data_source_name=name,
        configured_params=params,
        run_id=_uuid(data["run_id"], "run_id"),
        project_id=None if project is None else _uuid(project, "project_id"),
        max_age=None if max_age is None else _max_age(max_age),
        replay=None if replay is None else _replay(replay),
    )


def _max_age(value: Any) -> float:
    # bool is an int to Python, not a number to a caller; NaN and Infinity never parse.
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise InvalidRequest("max_age must be a number of seconds, 0 or more", field="max_age")
    return float(value)


def _replay(value: Any) -> Replay:
    if not isinstance(value, dict):
        raise InvalidRequest("replay must be an object", field="replay")
    unknown = sorted(value.keys() - REPLAY_FIELDS)
    if unknown:
        listed = shortlist(unknown)
        raise InvalidRequest(f"unknown replay fields: {', '.join(listed)}", fields=listed)
    if ("as_of" in value) == ("run_id" in value):
        raise InvalidRequest("replay takes exactly one of as_of and run_id", field="replay")
    mode = value.get("mode", "strict")
    if mode not in REPLAY_MODES:
        raise InvalidRequest("replay.mode must be strict or hybrid", field="replay.mode")
    if "run_id" in value:
        return Replay(None, _uuid(value["run_id"], "replay.run_id"), mode)
    return Replay(_instant(value["as_of"]), None, mode)


def _instant(value: Any) -> datetime:
    """An RFC 3339 date-time, with its offset (an instant, not a wall-clock time), in UTC."""
    problem = "replay.as_of must be an RFC 3339 date-time with an offset"
    if not isinstance(value, str) or len(value) > 64:
        raise InvalidRequest(problem, field="replay.as_of")
    try:
        instant = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidRequest(problem, field="replay.as_of") from exc
    if instant.tzinfo is None:
        raise InvalidRequest(problem, field="replay.as_of")
    try:
        return instant.astimezone(UTC)
    except OverflowError as exc:  # 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        raise InvalidRequest(problem, field="replay.as_of") from exc


def success(
    *,
    data_object_id: str,
    origin: Origin,
    key: str,
    value_json: bytes,
    start_time: float | None,
    end_time: float | None,
    stale: bool = False,
    replayed_created_at: float | None = None,
) -> bytes:
    """The answer; ``stale`` marks a cached value served past its TTL because the upstream
    failed; ``replayed_created_at`` (epoch seconds) the stored object a replay answered with."""
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
    if replayed_created_at is not None:
        created = datetime.fromtimestamp(replayed_created_at, UTC).isoformat()
        body["replay"] = {"data_object_created_at": created}
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
