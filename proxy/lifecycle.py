"""Rules of a data source's life, DRAFT → PUBLISHED → ARCHIVED: pure decisions.

A draft may be replaced whole. A published source is what running policies
depend on, so only the fields that cannot change what is fetched may change.
"""

from __future__ import annotations

from typing import Any

from proxy.source_spec import DataSourceSpec
from proxy.templates import Names, TemplateError, compile_source, scan_names

MUTABLE_WHEN_PUBLISHED = frozenset(
    {
        "description",
        "caching",
        "retention_days",
        "source.timeout",
        "source.retry",
        "source.budget",
    }
)


def resolve_names(spec: DataSourceSpec) -> tuple[list[str], list[str]]:
    """The source's ``(runtime_params, variables)``: derived from the templates
    when not given, checked against them when given. Raises TemplateError."""
    names: Names = scan_names(spec.source)
    declared_variables = set(spec.variables or ())
    runtime_params = spec.runtime_params
    if runtime_params is None:
        runtime_params = sorted(names.params - declared_variables)
    variables = spec.variables
    if variables is None:
        # A plain {{ x }} that is not a runtime param can only be a variable.
        variables = sorted(names.env | (names.params - set(runtime_params)))
    for label, values in (("runtime_params", runtime_params), ("variables", variables)):
        if len(set(values)) != len(values):
            raise TemplateError(f"{label} lists a name twice")
    compile_source(spec.source, runtime_params, variables)
    return runtime_params, variables


def changed_fields(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted paths of the top-level and ``source.*`` fields that differ."""
    changed = set()
    for field in old.keys() | new.keys():
        path = f"{prefix}{field}"
        if field == "source" and not prefix:
            changed |= changed_fields(old.get(field) or {}, new.get(field) or {}, "source.")
        elif old.get(field) != new.get(field):
            changed.add(path)
    return changed


def forbidden_changes(old: DataSourceSpec, new: DataSourceSpec) -> list[str]:
    """Fields a PUT on a published source may not change, sorted; empty if allowed."""
    diff = changed_fields(old.model_dump(), new.model_dump())
    return sorted(diff - MUTABLE_WHEN_PUBLISHED)
