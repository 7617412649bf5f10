"""proxy.messages: the internal route's request parsing and answer assembly."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import orjson
import pytest

from proxy.errors import InvalidRequest, UpstreamHTTPError
from proxy.messages import (
    FIELDS,
    REQUEST_SCHEMA,
    Replay,
    _members,
    failure,
    loads_strict,
    parse_request,
    success,
)
from proxy.openapi import document
from proxy.routes.internal import PATH

RUN = str(uuid.uuid4())


def test_parse_the_reference_shape() -> None:
    body = orjson.dumps({"data_source_name": "a", "configured_params": {"x": [1]}, "run_id": RUN})
    request = parse_request(body)
    assert request.data_source_name == "a"
    assert request.configured_params == {"x": [1]}
    assert request.run_id == uuid.UUID(RUN)
    assert request.project_id is None


def test_project_id_is_optional_and_checked() -> None:
    project = str(uuid.uuid4())
    body = {"data_source_name": "a", "configured_params": {}, "run_id": RUN, "project_id": project}
    assert parse_request(orjson.dumps(body)).project_id == uuid.UUID(project)
    with pytest.raises(InvalidRequest, match="project_id"):
        parse_request(orjson.dumps({**body, "project_id": "p1"}))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "not valid JSON"),
        (b'"text"', "JSON object"),
        (b'{"data_source_name": "", "configured_params": {}, "run_id": "%s"}', "data_source_name"),
        (b'{"configured_params": {}, "run_id": "%s"}', "missing fields: data_source_name"),
        (
            b'{"data_source_name": "a", "configured_params": null, "run_id": "%s"}',
            "configured_params",
        ),
        (b'{"data_source_name": "a", "configured_params": {}, "run_id": 5}', "run_id"),
        (
            b'{"data_source_name": "a", "configured_params": {}, "run_id": "%s", "x": 1}',
            "unknown fields: x",
        ),
    ],
)
def test_invalid_shapes(body: bytes, message: str) -> None:
    if b"%s" in body:
        body = body % RUN.encode()
    with pytest.raises(InvalidRequest, match=message):
        parse_request(body)


def test_success_embeds_value_bytes_unchanged() -> None:
    answer = orjson.loads(
        success(
            data_object_id="d",
            origin="CACHE",
            key="k",
            value_json=b'{"b":1,"a":[2]}',
            start_time=None,
            end_time=None,
        )
    )
    assert answer == {
        "data_object_id": "d",
        "origin": "CACHE",
        "key": "k",
        "value": {"b": 1, "a": [2]},
        "start_time": None,
        "end_time": None,
        "error": None,
    }


def test_failure_carries_code_message_and_extra() -> None:
    answer = orjson.loads(
        failure(UpstreamHTTPError(503), origin="REQUEST", key="k", start_time=1.0)
    )
    assert answer["value"] is None
    assert answer["error"] == {
        "code": "HTTP_ERROR",
        "message": "upstream answered HTTP 503",
        "upstream_status": 503,
    }


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"a": 1, "a": 2}', "repeats a key"),
        (b'{"a": {"b": 1, "b": 1}}', "repeats a key"),
        (b'[{"x": 1}, {"x": 2, "y": 3, "x": 4}]', "repeats a key"),
        # A colon in a string makes up for the member a repeat drops: still found.
        (b'{"u": "http://x", "u": 1}', "repeats a key"),
        (b'{"a": [{"b": ":"}], "a": 1}', "repeats a key"),
        (b"[" * 65 + b"]" * 65, "deeper than 64"),
        (b'{"a": ' * 100_000, "not valid JSON"),
        (b'{"a": NaN}', "not valid JSON"),
        (b'{"a": 1e400}', "not valid JSON"),
        (b'{"a": "\xff"}', "not valid JSON"),
        (b'{"a": "\\ud800"}', "not valid JSON"),
    ],
)
def test_loads_strict_refuses(body: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        loads_strict(body)


def test_loads_strict_reads_what_is_fine() -> None:
    """Equal keys in different objects are not duplicates; 64 levels are allowed."""
    assert loads_strict(b'{"a": {"a": 1}, "b": [{"a": 2}]}') == {"a": {"a": 1}, "b": [{"a": 2}]}
    assert loads_strict(b"[" * 64 + b"]" * 64) is not None
    assert loads_strict(b'{"at": "10:00", "b": [{"c": "a:b"}]}') == {
        "at": "10:00",
        "b": [{"c": "a:b"}],
    }


def test_members_counts_every_object_member_at_any_depth() -> None:
    """What the duplicate check's shortcut compares with the body's colons."""
    assert _members({"a": {"b": [{"c": 1}, [{"d": 2, "e": 3}]]}, "f": "x:y"}) == 6
    assert _members([1, "a", None]) == 0


def test_parse_request_refuses_what_loads_strict_refuses() -> None:
    body = b'{"data_source_name": "a", "data_source_name": "b", "configured_params": {}}'
    with pytest.raises(InvalidRequest, match="repeats a key"):
        parse_request(body)


def test_the_published_schema_is_the_one_the_parser_keeps() -> None:
    """One owner of the request shape: /openapi.json publishes what parse_request accepts."""
    operation = document()["paths"][PATH]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"] is REQUEST_SCHEMA
    assert set(REQUEST_SCHEMA["properties"]) == FIELDS
    longest = "n" * REQUEST_SCHEMA["properties"]["data_source_name"]["maxLength"]
    body = {"data_source_name": longest, "configured_params": {}, "run_id": RUN}
    assert parse_request(orjson.dumps(body)).data_source_name == longest
    with pytest.raises(InvalidRequest, match="data_source_name"):
        parse_request(orjson.dumps({**body, "data_source_name": longest + "n"}))
    with pytest.raises(InvalidRequest) as caught:
        parse_request(b'{"project_id": null}')
    assert caught.value.extra["fields"] == sorted(REQUEST_SCHEMA["required"])


def _with(**extra: object) -> bytes:
    return orjson.dumps({"data_source_name": "a", "configured_params": {}, "run_id": RUN, **extra})


def test_replay_as_of_is_an_instant_in_utc() -> None:
    request = parse_request(_with(replay={"as_of": "2026-01-05T14:00:00+02:00"}, max_age=0))
    assert request.replay == Replay(datetime(2026, 1, 5, 12, tzinfo=UTC), None, "strict")
    assert request.replay.by == "AS_OF"
    assert request.max_age == 0.0
    hybrid = parse_request(_with(replay={"as_of": "2026-01-05T12:00:00Z", "mode": "hybrid"}))
    assert hybrid.replay is not None and hybrid.replay.mode == "hybrid"


def test_replay_run_id() -> None:
    run = uuid.uuid4()
    request = parse_request(_with(replay={"run_id": str(run), "mode": "strict"}))
    assert request.replay == Replay(None, run, "strict")
    assert request.replay.by == "RUN_ID"


@pytest.mark.parametrize(
    ("replay", "message"),
    [
        ("2026-01-05", "replay must be an object"),
        ({}, "exactly one of as_of and run_id"),
        ({"as_of": "2026-01-05T12:00:00Z", "run_id": RUN}, "exactly one"),
        ({"as_of": "2026-01-05T12:00:00"}, "with an offset"),
        ({"as_of": "yesterday"}, "RFC 3339"),
        ({"as_of": 1767614400}, "RFC 3339"),
        ({"as_of": "0001-01-01T00:00:00+01:00"}, "RFC 3339"),
        ({"run_id": "r1"}, "replay.run_id is not a UUID"),
        ({"run_id": RUN, "mode": "lenient"}, "strict or hybrid"),
        ({"run_id": RUN, "at": 1}, "unknown replay fields: at"),
    ],
)
def test_invalid_replays(replay: object, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_request(_with(replay=replay))


def test_a_replay_answer_says_when_its_object_was_created() -> None:
    answer = orjson.loads(
        success(
            data_object_id="d",
            origin="CACHE",
            key="k",
            value_json=b"1",
            start_time=None,
            end_time=None,
            replayed_created_at=datetime(2026, 1, 5, 12, 0, 0, 250, tzinfo=UTC).timestamp(),
        )
    )
    assert answer["replay"] == {"data_object_created_at": "2026-01-05T12:00:00.000250+00:00"}
