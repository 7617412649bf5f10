"""Data sources kept as files (in Git, in a ConfigMap), for ``databroker sources apply DIR``.

A file (``.json``, ``.yaml``, ``.yml``) holds one source or a list of them (YAML: or
several documents), each the admin API's create body plus two keys of its own:
``publish: true`` (publish it once it is as the file says) and ``variables_from``
(where each variable's value comes from: ``{"env": NAME}`` or ``{"file": PATH}``,
a path relative to the file, e.g. a mounted Secret). Values never sit in the file.

Pure but for reading the directory: the command (``proxy.cli``) lists the broker's
sources, asks ``plan`` what to do, prints it and, unless it is a dry run, does it.
A field the file leaves out is not compared: the file says what it cares about.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml  # PyYAML: installed with uvicorn[standard]

from proxy.source_spec import CachingOptions

SUFFIXES = (".json", ".yaml", ".yml")
OWN_KEYS = frozenset({"publish", "variables_from"})


class SourceFileError(ValueError):
    """A file that cannot be applied: the message names the file (never a value)."""


@dataclass(frozen=True, slots=True)
class SourceFile:
    path: Path
    spec: dict[str, Any]
    """The admin API's body, as the file says it."""
    publish: bool
    variables_from: dict[str, tuple[Literal["env", "file"], str]]


@dataclass(frozen=True, slots=True)
class Change:
    field: str
    old: Any
    new: Any


@dataclass(frozen=True, slots=True)
class Step:
    """What ``apply`` does for one file's source."""

    file: SourceFile
    action: Literal["create", "update", "unchanged"]
    data_source_id: str | None = None
    changes: list[Change] = field(default_factory=list)
    publish: bool = False

    @property
    def name(self) -> str:
        name: str = self.file.spec["name"]
        return name


def read_dir(directory: Path) -> list[SourceFile]:
    """Every source of every file in ``directory`` (not its subdirectories), by file name."""
    found: list[SourceFile] = []
    for path in sorted(directory.iterdir()):
        if path.suffix in SUFFIXES and path.is_file():
            found += [parse(path, document) for document in _documents(path)]
    names = [source.spec["name"] for source in found]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise SourceFileError(f"{directory}: more than one file defines {', '.join(twice)}")
    return found


def _documents(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            loaded = json.loads(text)
            documents = loaded if isinstance(loaded, list) else [loaded]
        else:
            documents = []
            for loaded in yaml.safe_load_all(text):
                documents += loaded if isinstance(loaded, list) else [loaded]
    except (ValueError, yaml.YAMLError) as exc:
        # The parser's message may quote the file: a line is not a value, but say less.
        raise SourceFileError(f"{path}: not valid {path.suffix[1:].upper()}") from exc
    return [document for document in documents if document is not None]


def parse(path: Path, document: Any) -> SourceFile:
    if not isinstance(document, dict) or not isinstance(document.get("name"), str):
        raise SourceFileError(f"{path}: each source is an object with a name")
    name = document["name"]
    publish = document.get("publish", False)
    if not isinstance(publish, bool):
        raise SourceFileError(f"{path}: {name}: publish is true or false")
    given = document.get("variables_from") or {}
    if not isinstance(given, dict):
        raise SourceFileError(f"{path}: {name}: variables_from maps names to env or file")
    variables_from: dict[str, tuple[Literal["env", "file"], str]] = {}
    for variable, origin in given.items():
        match origin:
            case {"env": str(env)} if len(origin) == 1:
                variables_from[variable] = ("env", env)
            case {"file": str(file)} if len(origin) == 1:
                variables_from[variable] = ("file", str(path.parent / file))
            case _:
                raise SourceFileError(
                    f"{path}: {name}: variables_from.{variable} is {{env: NAME}} or {{file: PATH}}"
                )
    spec = {key: value for key, value in document.items() if key not in OWN_KEYS}
    return SourceFile(path, spec, publish, variables_from)


def variable_values(
    source: SourceFile,
    environ: Mapping[str, str] = os.environ,
    read: Callable[[str], str] = lambda path: Path(path).read_text(encoding="utf-8"),
) -> list[dict[str, str]]:
    """The admin API's variables body; a missing value is an error naming where it was
    looked for. A file's one trailing newline is not part of the value (Secrets mount so)."""
    values = []
    for variable, (kind, where) in sorted(source.variables_from.items()):
        if kind == "env":
            value = environ.get(where)
            if value is None:
                raise SourceFileError(
                    f"{source.path}: {source.spec['name']}: variable {variable}: "
                    f"environment variable {where} is not set"
                )
        else:
            try:
                value = read(where).removesuffix("\n")
            except OSError as exc:
                raise SourceFileError(
                    f"{source.path}: {source.spec['name']}: variable {variable}: "
                    f"cannot read {where} ({exc.strerror})"
                ) from None
        values.append({"name": variable, "value": value})
    return values


def plan(files: list[SourceFile], existing: list[dict[str, Any]]) -> list[Step]:
    """One step per file source, against the broker's (non-archived) sources."""
    by_name = {source["name"]: source for source in existing}
    steps = []
    for file in files:
        have = by_name.get(file.spec["name"])
        if have is None:
            steps.append(Step(file, "create", publish=file.publish))
            continue
        changes = differences(_comparable(file.spec), have)
        steps.append(
            Step(
                file,
                "update" if changes else "unchanged",
                have["data_source_id"],
                changes,
                publish=file.publish and have["status"] != "PUBLISHED",
            )
        )
    return steps


def _comparable(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as the broker answers it: a TTL given as days/hours/... is stored in seconds."""
    caching = spec.get("caching")
    if isinstance(caching, dict) and isinstance(caching.get("ttl"), dict):
        seconds = CachingOptions.model_validate(caching).ttl_seconds
        return {**spec, "caching": {**caching, "ttl": seconds}}
    return spec


def differences(want: Mapping[str, Any], have: Mapping[str, Any], prefix: str = "") -> list[Change]:
    """The fields ``want`` gives that ``have`` does not hold, as dotted paths; objects
    compared key by key, everything else whole."""
    changes = []
    for key, new in want.items():
        old = have.get(key)
        if isinstance(new, dict) and isinstance(old, dict):
            changes += differences(new, old, f"{prefix}{key}.")
        elif new != old:
            changes.append(Change(f"{prefix}{key}", old, new))
    return changes


def describe(step: Step, dry_run: bool) -> list[str]:
    """The lines ``apply`` prints for ``step``: never a variable's value."""
    verb = f"would {step.action}" if dry_run and step.action != "unchanged" else step.action
    lines = [f"{verb} {step.name} ({step.file.path.name})"]
    lines += [
        f"  {change.field}: {json.dumps(change.old)} -> {json.dumps(change.new)}"
        for change in step.changes
    ]
    if step.file.variables_from:
        names = ", ".join(sorted(step.file.variables_from))
        lines.append(f"  {'would set' if dry_run else 'set'} variables {names} (values not shown)")
    if step.publish:
        lines.append(f"  {'would publish' if dry_run else 'publish'}")
    return lines
