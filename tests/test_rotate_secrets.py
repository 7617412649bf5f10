"""Key rotation end to end: ``databroker rotate-secrets`` between two brokers.

Variables and a credential are written under key A; a broker with ``B,A`` still serves them; the command
re-encrypts every one under B in one transaction; afterwards B alone is enough and A
decrypts nothing. The command prints a count, never a value.
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.app import create_app
from proxy.secrets import SecretBox, SecretKeyError
from proxy.settings import Settings
from proxy.source_spec import DataSourceSpec
from proxy.source_store import SourceStore, VariableValue
from tests.conftest import Broker
from tests.harness import DATABROKER, EXIT_DEADLINE, clean_env
from tests.servers import Upstream, serve_in_thread

pytestmark = pytest.mark.slow

VALUES = {"TOKEN": "rotation-canary-token", "TENANT": "rotation-canary-tenant"}
CREDENTIAL = "rotation-canary-credential"


def key() -> str:
    return Fernet.generate_key().decode()


async def tokens(db: AsyncEngine) -> dict[uuid.UUID, str | None]:
    async with db.connect() as conn:
        rows = await conn.execute(
            text("SELECT data_source_env_var_id, value FROM data_source_env_var")
        )
        return {row.data_source_env_var_id: row.value for row in rows}


async def credential_token(db: AsyncEngine) -> str:
    """The one stored credential's ciphertext."""
    async with db.connect() as conn:
        value: str = (
            await conn.execute(text("SELECT value FROM data_source_credential"))
        ).scalar_one()
        return value


async def rotate(pg_url: str, secret_key: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = clean_env(database_url=pg_url, secret_key=secret_key)
    return await asyncio.to_thread(
        subprocess.run,
        [str(DATABROKER), "rotate-secrets"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=EXIT_DEADLINE,
    )


async def call_through(settings: Settings, upstream: Upstream) -> dict[str, Any]:
    """One uncached broker call with ``settings``; the headers the upstream received."""
    with serve_in_thread(create_app(settings)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            answer = await Broker(url, settings, client).call("bureau")
    assert answer.status_code == 200, answer.text
    assert answer.json()["origin"] == "REQUEST"
    headers: dict[str, Any] = upstream.received[-1]["headers"]
    return headers


async def test_rotate_secrets_moves_every_value_to_the_newest_key(
    settings: Settings, db: AsyncEngine, pg_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    a, b = key(), key()
    url = upstream.answer("/bureau", b'{"score": 700}')
    spec = {
        "name": "bureau",
        "source": {
            "url": url,
            "headers": {"Authorization": "Bearer {{ env.TOKEN }}", "X-Tenant": "{{ env.TENANT }}"},
            "response_type": "JSON",
        },
    }
    other = {"name": "other", "source": {"url": url, "headers": {"X-Key": "{{ env.KEY }}"}}}
    under_a = settings.model_copy(update={"secret_key": SecretStr(a)})
    with serve_in_thread(create_app(under_a)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            broker = Broker(base, under_a, client)
            bureau = (await broker.register(spec, VALUES))["data_source_id"]
            await broker.register(other, {"KEY": None})  # stored without a value: nothing to rotate
            body = [{"credential_type": "CLIENT_SECRET", "value": CREDENTIAL}]
            put = await broker.admin("PUT", f"/data-sources/{bureau}/credentials", body)
            assert put.status_code == 200, put.text
    credential = await credential_token(db)
    assert SecretBox([a]).decrypt(credential) == CREDENTIAL
    before = await tokens(db)
    assert len(before) == 3
    assert {SecretBox([a]).decrypt(t) for t in before.values() if t} == set(VALUES.values())

    expected = {"authorization": f"Bearer {VALUES['TOKEN']}", "x-tenant": VALUES["TENANT"]}
    both = settings.model_copy(update={"secret_key": SecretStr(f"{b},{a}")})
    assert expected.items() <= (await call_through(both, upstream)).items()

    result = await rotate(pg_url, f"{b},{a}", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "rotated 2 stored variable values and 1 credential values to the newest key"
    )
    assert not any(v in result.stdout + result.stderr for v in [*VALUES.values(), CREDENTIAL])

    after = await tokens(db)
    assert after.keys() == before.keys()
    rotated = {i: t for i, t in after.items() if t is not None}
    assert len(rotated) == 2 and all(before[i] != t for i, t in rotated.items())
    assert {SecretBox([b]).decrypt(t) for t in rotated.values()} == set(VALUES.values())
    for token in rotated.values():
        with pytest.raises(SecretKeyError):
            SecretBox([a]).decrypt(token)

    rotated_credential = await credential_token(db)
    assert rotated_credential != credential
    assert SecretBox([b]).decrypt(rotated_credential) == CREDENTIAL
    with pytest.raises(SecretKeyError):
        SecretBox([a]).decrypt(rotated_credential)

    only_b = settings.model_copy(update={"secret_key": SecretStr(b)})
    assert expected.items() <= (await call_through(only_b, upstream)).items()


async def test_one_value_no_key_decrypts_leaves_every_value_as_it_was(
    db: AsyncEngine, pg_url: str, tmp_path: Path
) -> None:
    a, b, stranger = key(), key(), key()
    store = SourceStore(db, SecretBox([a]))
    for name in ("one", "two"):
        source = DataSourceSpec.model_validate(
            {"name": name, "source": {"url": "http://127.0.0.1:9/{{ env.V }}"}}
        )
        row = await store.create(source, None)
        await store.set_variables(row.data_source_id, [VariableValue(name="V", value=name)], None)
    # Rewritten last, this row is met last by the scan (Postgres appends the new version):
    # the other value is rotated in the transaction before this one fails it.
    lost = next(iter(await tokens(db)))
    async with db.begin() as conn:
        await conn.execute(
            text("UPDATE data_source_env_var SET value = :v WHERE data_source_env_var_id = :i"),
            {"v": SecretBox([stranger]).encrypt("lost"), "i": lost},
        )
    before = await tokens(db)
    assert len(before) == 2

    result = await rotate(pg_url, f"{b},{a}", tmp_path)
    assert result.returncode == 1
    assert "DATABROKER_SECRET_KEY" in result.stderr and "nothing was changed" in result.stderr
    assert "Traceback" not in result.stderr
    assert await tokens(db) == before
