"""proxy.lifecycle: name derivation and what a published source may change."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.lifecycle import forbidden_changes, resolve_names
from proxy.source_spec import DataSourceSpec
from proxy.templates import TemplateError


def spec(**fields: Any) -> DataSourceSpec:
    base: dict[str, Any] = {
        "name": "s",
        "source": {
            "url": "https://api.example.com/users/{{ user_id }}",
            "headers": {"Authorization": "Bearer {{ env.TOKEN }}"},
        },
    }
    return DataSourceSpec.model_validate({**base, **fields})


def test_names_derived_from_templates() -> None:
    assert resolve_names(spec()) == (["user_id"], ["TOKEN"])


def test_plain_placeholder_declared_as_variable() -> None:
    seed = spec(
        source={"url": "https://x/{{ username }}", "headers": {"A": "token {{ github_token }}"}},
        runtime_params=["username"],
        variables=["github_token"],
    )
    assert resolve_names(seed) == (["username"], ["github_token"])
    only_runtime = seed.model_copy(update={"variables": None})
    assert resolve_names(only_runtime) == (["username"], ["github_token"])


def test_declared_but_unused_runtime_param_is_allowed() -> None:
    assert resolve_names(spec(runtime_params=["user_id", "as_of"])) == (
        ["user_id", "as_of"],
        ["TOKEN"],
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"runtime_params": [], "variables": ["TOKEN"]}, "user_id"),
        ({"variables": []}, "TOKEN"),
        ({"runtime_params": ["user_id", "user_id"]}, "twice"),
    ],
)
def test_declarations_checked_against_templates(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        resolve_names(spec(**fields))


def test_published_may_change_only_safe_fields() -> None:
    old = spec()
    allowed = spec(
        description="new",
        caching={"enabled": True, "ttl": 5},
        source={**old.source.model_dump(), "timeout": 3, "retry": {"max_retries": 2}},
    )
    assert forbidden_changes(old, allowed) == []
    moved = spec(name="t", source={**old.source.model_dump(), "url": "https://evil.example/x"})
    assert forbidden_changes(old, moved) == ["name", "source.url"]
