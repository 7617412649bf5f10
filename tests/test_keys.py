"""proxy.keys: the seed's cache key, byte for byte, and the Redis key layout."""

from __future__ import annotations

import hashlib
import json
import uuid
from fnmatch import fnmatchcase
from typing import Any

import pytest

from proxy.keys import KeyLayout, make_cache_key

SOURCE_ID = "550e8400-e29b-41d4-a716-446655440000"
# md5 of '{"data_source_id": "550e8400-…", "variables": {"include": "profile", "user_id": "12345"}}',
# computed once with the seed's make_cache_key.
GOLDEN = "e465f2acfb33f03ef426739839a3e75c"


def seed_make_cache_key(data_source_id: Any, variables: dict[str, Any]) -> str:
    """The seed's formula, verbatim."""
    content = dict(data_source_id=str(data_source_id), variables=variables)
    content_str = json.dumps(content, sort_keys=True)
    return hashlib.md5(content_str.encode("utf-8")).hexdigest()


# --- make_cache_key ------------------------------------------------------------------------


def test_golden_key() -> None:
    params = {"user_id": "12345", "include": "profile"}
    assert make_cache_key(SOURCE_ID, params) == GOLDEN
    assert make_cache_key(uuid.UUID(SOURCE_ID), params) == GOLDEN


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"user_id": "12345", "include": "profile"},
        {"n": 1, "f": 2.5, "b": True, "none": None, "list": [3, 1, 2], "nested": {"z": 1, "a": 2}},
        {"big": 2**70, "neg": -0.0, "text": 'quotes " and \\ and \n newline'},
    ],
)
def test_key_is_the_seed_formula(params: dict[str, Any]) -> None:
    sid = uuid.uuid4()
    assert make_cache_key(sid, params) == seed_make_cache_key(sid, params)
    assert make_cache_key(str(sid), params) == seed_make_cache_key(sid, params)


def test_key_order_does_not_matter() -> None:
    a = {"user_id": "12345", "include": "profile", "nested": {"x": 1, "y": [1, 2]}}
    b = {"nested": {"y": [1, 2], "x": 1}, "include": "profile", "user_id": "12345"}
    assert (
        make_cache_key(SOURCE_ID, a)
        == make_cache_key(SOURCE_ID, b)
        == make_cache_key(SOURCE_ID, dict(reversed(list(a.items()))))
    )


def test_list_order_and_value_types_matter() -> None:
    assert make_cache_key(SOURCE_ID, {"l": [1, 2]}) != make_cache_key(SOURCE_ID, {"l": [2, 1]})
    assert make_cache_key(SOURCE_ID, {"n": 1}) != make_cache_key(SOURCE_ID, {"n": "1"})
    assert make_cache_key(SOURCE_ID, {"n": 1}) != make_cache_key(str(uuid.uuid4()), {"n": 1})


def test_non_ascii_is_escaped_like_the_stdlib() -> None:
    params = {"name": "José", "city": "東京", "emoji": "🙂"}
    escaped = json.dumps({"data_source_id": SOURCE_ID, "variables": params}, sort_keys=True)
    assert "\\u00e9" in escaped and "\\ud83d\\ude42" in escaped  # what the seed hashes
    raw = json.dumps(
        {"data_source_id": SOURCE_ID, "variables": params}, sort_keys=True, ensure_ascii=False
    )
    key = make_cache_key(SOURCE_ID, params)
    assert key == hashlib.md5(escaped.encode()).hexdigest()
    assert key != hashlib.md5(raw.encode()).hexdigest()


def test_key_is_32_lowercase_hex() -> None:
    key = make_cache_key(SOURCE_ID, {"a": 1})
    assert len(key) == 32 and set(key) <= set("0123456789abcdef")


# --- KeyLayout -----------------------------------------------------------------------------


def test_cache_entry_key() -> None:
    layout = KeyLayout("databroker:")
    sid = uuid.UUID(SOURCE_ID)
    expected = f"databroker:cache:{SOURCE_ID}:{GOLDEN}"
    assert layout.cache_entry(sid, GOLDEN) == expected
    assert layout.cache_entry(SOURCE_ID, GOLDEN) == expected


def test_cache_patterns() -> None:
    layout = KeyLayout("databroker:")
    assert layout.cache_pattern() == "databroker:cache:*"  # the operators' redis-cli flush
    assert layout.cache_pattern(uuid.UUID(SOURCE_ID)) == f"databroker:cache:{SOURCE_ID}:*"


def test_patterns_match_their_own_entries_only() -> None:
    layout = KeyLayout("p:")
    sid, other = uuid.uuid4(), uuid.uuid4()
    entry = layout.cache_entry(sid, GOLDEN)
    assert fnmatchcase(entry, layout.cache_pattern())
    assert fnmatchcase(entry, layout.cache_pattern(sid))
    assert not fnmatchcase(entry, layout.cache_pattern(other))
    assert not fnmatchcase(entry, KeyLayout("q:").cache_pattern())


def test_registry_channel_is_beside_the_cache_family() -> None:
    layout = KeyLayout("databroker:")
    assert layout.registry_channel == "databroker:events:registry"
    assert layout.registry_channel.startswith(layout.prefix)
    assert not fnmatchcase(layout.registry_channel, layout.cache_pattern())


def test_every_key_starts_with_the_prefix() -> None:
    layout = KeyLayout("tenant-7:")
    assert layout.cache_entry(SOURCE_ID, GOLDEN).startswith("tenant-7:cache:")
    assert layout.cache_pattern().startswith("tenant-7:cache:")
    assert layout.registry_channel.startswith("tenant-7:")


def test_glob_characters_in_the_prefix_are_escaped_in_patterns() -> None:
    layout = KeyLayout("a?[x]*\\:")
    assert layout.cache_pattern() == "a\\?\\[x\\]\\*\\\\:cache:*"
    assert layout.cache_pattern(SOURCE_ID) == f"a\\?\\[x\\]\\*\\\\:cache:{SOURCE_ID}:*"
    assert layout.cache_entry(SOURCE_ID, GOLDEN) == f"a?[x]*\\:cache:{SOURCE_ID}:{GOLDEN}"
