"""``databroker sources apply DIR``: the files and the plan (pure), then the command against a
running ``databroker serve``: dry run, apply, apply again (nothing to do), a change."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.source_files import (
    Change,
    SourceFile,
    SourceFileError,
    describe,
    differences,
    parse,
    plan,
    read_dir,
    variable_values,
)
from tests.conftest import REDIS_URL, TABLES
from tests.harness import (
    ADMIN_TOKEN,
    DATABROKER,
    admin_headers,
    broker_request,
    clean_env,
    sidecar_env,
)
from tests.instances import sidecar
from tests.servers import Upstream

SECRET = "canary-apply-5e1f"
HERE = Path("/sources")


def source(name: str = "alpha", **more: Any) -> dict[str, Any]:
    return {"name": name, "source": {"url": "http://127.0.0.1:1/x"}, **more}


def on_broker(name: str = "alpha", status: str = "DRAFT", **more: Any) -> dict[str, Any]:
    answer = {
        "data_source_id": f"id-{name}",
        "name": name,
        "description": None,
        "source": {"url": "http://127.0.0.1:1/x", "method": "GET", "headers": {}},
        "caching": {"enabled": False, "ttl": None},
        "status": status,
    }
    return {**answer, **more}


# --- files and plan (pure) -----------------------------------------------------------------


def test_a_file_source_keeps_its_own_keys_out_of_the_spec() -> None:
    document = source(publish=True, variables_from={"A": {"env": "X"}, "B": {"file": "b.txt"}})
    parsed = parse(HERE / "a.yaml", document)
    assert parsed.spec == source() and parsed.publish
    assert parsed.variables_from == {"A": ("env", "X"), "B": ("file", "/sources/b.txt")}


@pytest.mark.parametrize(
    "document",
    [
        [source()],
        {"source": {}},
        source(publish="yes"),
        source(variables_from=["A"]),
        source(variables_from={"A": "literal value"}),
        source(variables_from={"A": {"env": "X", "file": "y"}}),
    ],
)
def test_a_malformed_source_is_refused_naming_its_file(document: Any) -> None:
    with pytest.raises(SourceFileError, match=r"a\.yaml"):
        parse(HERE / "a.yaml", document)


def test_a_directory_reads_json_yaml_and_several_documents(tmp_path: Path) -> None:
    (tmp_path / "1.yaml").write_text(
        "name: a\nsource: {url: 'http://h/'}\n---\nname: b\nsource: {url: 'http://h/'}\n"
    )
    (tmp_path / "2.json").write_text(json.dumps([source("c")]))
    (tmp_path / "notes.txt").write_text("not a source")
    assert [f.spec["name"] for f in read_dir(tmp_path)] == ["a", "b", "c"]
    (tmp_path / "3.yml").write_text("name: a\nsource: {url: 'http://h/'}\n")
    with pytest.raises(SourceFileError, match="more than one file defines a"):
        read_dir(tmp_path)
    (tmp_path / "3.yml").write_text("name: [unclosed\n")
    with pytest.raises(SourceFileError, match=r"3\.yml: not valid YML"):
        read_dir(tmp_path)


def test_values_come_from_the_environment_or_a_file_and_are_never_described() -> None:
    file = parse(
        HERE / "a.yaml",
        source(publish=True, variables_from={"A": {"env": "X"}, "B": {"file": "b"}}),
    )
    values = variable_values(file, {"X": SECRET}, lambda path: f"{SECRET}-{path}\n")
    assert values == [
        {"name": "A", "value": SECRET},
        {"name": "B", "value": f"{SECRET}-/sources/b"},
    ]
    with pytest.raises(SourceFileError, match="environment variable X is not set"):
        variable_values(file, {}, lambda path: "")
    [step] = plan([file], [])
    for dry_run in (True, False):
        assert SECRET not in "\n".join(describe(step, dry_run))


def test_differences_compare_only_what_the_file_gives() -> None:
    have = on_broker(description="old")
    assert differences(source(), have) == []
    assert differences(source(description="new"), have) == [Change("description", "old", "new")]
    moved = source(source={"url": "http://127.0.0.1:1/y"})
    assert differences(moved, have) == [
        Change("source.url", "http://127.0.0.1:1/x", "http://127.0.0.1:1/y")
    ]


def test_the_plan_creates_updates_publishes_and_leaves_alone() -> None:
    files = [
        SourceFile(HERE / "a.json", source("new"), True, {}),
        SourceFile(
            HERE / "a.json",
            source("same", caching={"enabled": True, "ttl": {"hours": 1}}),
            True,
            {},
        ),
        SourceFile(HERE / "a.json", source("moved", description="now"), False, {}),
    ]
    existing = [
        on_broker("same", "PUBLISHED", caching={"enabled": True, "ttl": 3600}),
        on_broker("moved"),
        on_broker("untouched"),
    ]
    steps = plan(files, existing)
    assert [(s.name, s.action, s.publish) for s in steps] == [
        ("new", "create", True),
        ("same", "unchanged", False),  # already published; a TTL in hours is its seconds
        ("moved", "update", False),
    ]
    assert steps[2].data_source_id == "id-moved"
    assert describe(steps[2], dry_run=True) == [
        "would update moved (a.json)",
        '  description: null -> "now"',
    ]


# --- the command against a running broker --------------------------------------------------


def apply(directory: Path, url: str, *more: str, **env: str) -> tuple[int, str]:
    done = subprocess.run(
        [str(DATABROKER), "sources", "apply", str(directory), "--url", url, *more],
        env=clean_env(admin_token=ADMIN_TOKEN) | env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stdout + done.stderr


@pytest.mark.slow
async def test_apply_makes_the_broker_what_the_files_say(
    pg_url: str, db: AsyncEngine, redis_prefix: str, upstream: Upstream, tmp_path: Path
) -> None:
    try:
        await _apply_makes_the_broker_what_the_files_say(pg_url, redis_prefix, upstream, tmp_path)
    finally:
        # Brokers later in the session start on this database with keys of their own:
        # the variables stored here under this broker's key would stop their start-up.
        async with db.begin() as conn:
            await conn.execute(text(f"TRUNCATE {', '.join(TABLES)}"))


async def _apply_makes_the_broker_what_the_files_say(
    pg_url: str, redis_prefix: str, upstream: Upstream, tmp_path: Path
) -> None:
    upstream.answer("/score/7", b'{"score": 1}')
    files = tmp_path / "sources"
    files.mkdir()
    (files / "secret").write_text(f"{SECRET}-file\n")
    (files / "scoring.yaml").write_text(
        f"""
name: score
source:
  url: "{upstream.url}/score/{{{{ id }}}}"
  headers: {{X-Key: "{{{{ env.API_KEY }}}}", X-Other: "{{{{ env.OTHER }}}}"}}
  response_type: JSON
caching: {{enabled: true, ttl: {{hours: 1}}}}
publish: true
variables_from:
  API_KEY: {{env: VENDOR_API_KEY}}
  OTHER: {{file: secret}}
---
name: drafted
source: {{url: "{upstream.url}/draft"}}
"""
    )
    (files / "more.json").write_text(
        json.dumps([{"name": "third", "source": {"url": f"{upstream.url}/t"}}])
    )
    env = sidecar_env(pg_url, REDIS_URL, tmp_path / "outbox", redis_prefix=redis_prefix)
    given = {"VENDOR_API_KEY": f"{SECRET}-env"}
    async with sidecar(env, tmp_path) as broker:
        url = f"http://127.0.0.1:{broker.port}"

        async def listed() -> dict[str, dict[str, Any]]:
            answer = await broker.client.get("/data-sources", headers=admin_headers())
            return {s["name"]: s for s in answer.json()}

        # A value that cannot be read stops everything before anything changed.
        code, out = apply(files, url)
        assert code == 1 and "environment variable VENDOR_API_KEY is not set" in out, out
        code, out = apply(files, url, "--dry-run", **given)
        assert code == 0, out
        assert "would create score (scoring.yaml)" in out and "would publish" in out
        assert "would set variables API_KEY, OTHER (values not shown)" in out
        assert (
            out.splitlines()[-1] == "dry run: 3 to create, 0 to update, 1 to publish, 0 unchanged"
        )
        assert await listed() == {}

        code, out = apply(files, url, **given)
        assert code == 0, out
        sources = await listed()
        assert {name: s["status"] for name, s in sources.items()} == {
            "score": "PUBLISHED",
            "drafted": "DRAFT",
            "third": "DRAFT",
        }
        answer = await broker.client.post(
            "/internal/data-broker", json=broker_request("score", {"id": "7"})
        )
        assert answer.json()["value"] == {"score": 1}, answer.text
        [sent] = [r for r in upstream.received if r["path"] == "/score/7"]
        assert (sent["headers"]["x-key"], sent["headers"]["x-other"]) == (
            f"{SECRET}-env",
            f"{SECRET}-file",
        )

        code, again = apply(files, url, **given)
        assert code == 0 and again.splitlines()[-1] == (
            "0 to create, 0 to update, 0 to publish, 3 unchanged"
        ), again
        assert await listed() == sources

        # A change a published source may take: shown by the dry run, then made.
        scoring = (files / "scoring.yaml").read_text()
        (files / "scoring.yaml").write_text(scoring.replace("ttl: {hours: 1}", "ttl: 60"))
        code, diff = apply(files, url, "--dry-run", **given)
        assert code == 0 and "would update score (scoring.yaml)\n  caching.ttl: 3600 -> 60" in diff
        code, out = apply(files, url, **given)
        assert code == 0, out
        assert (await listed())["score"]["caching"]["ttl"] == 60
        # A change a published source may not take: the broker's refusal ends the run.
        moved = (files / "scoring.yaml").read_text().replace("/score/", "/scores/")
        (files / "scoring.yaml").write_text(moved)
        code, refused = apply(files, url, **given)
        assert code == 1 and f"PUT /data-sources/{sources['score']['data_source_id']}" in refused
        assert (await listed())["score"]["source"]["url"].endswith("/score/{{ id }}")
        for printed in (out, again, diff, refused):
            assert SECRET not in printed
