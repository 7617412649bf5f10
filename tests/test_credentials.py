"""``GET|PUT /data-sources/{id}/credentials``: stored encrypted, answered masked, scoped to
the project, refused with 422 without echoing a value."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.secrets import SecretBox
from proxy.source_store import CREDENTIAL_MASK
from tests.conftest import Broker
from tests.harness import ADMIN_TOKEN

CANARY = "credential-canary-51d2"
SPEC = {"name": "vendor", "source": {"url": "http://127.0.0.1:9/v"}}
FIELDS = {"credential_type", "value", "credential_id", "data_source_id", "created_at"}


def items(**values: Any) -> list[dict[str, Any]]:
    return [{"credential_type": kind, "value": value} for kind, value in values.items()]


async def create(broker: Broker, spec: dict[str, Any] = SPEC) -> str:
    answer = await broker.admin("POST", "/data-sources", spec)
    assert answer.status_code == 200, answer.text
    sid: str = answer.json()["data_source_id"]
    return sid


async def ok(answer: httpx.Response) -> list[dict[str, Any]]:
    assert answer.status_code == 200, answer.text
    assert CANARY not in answer.text
    body: list[dict[str, Any]] = answer.json()
    return body


async def stored(db: AsyncEngine, broker: Broker) -> dict[str, Any]:
    """Each stored credential's value, decrypted with the broker's key; the rows hold none."""
    assert broker.settings.secret_key is not None
    box = SecretBox([broker.settings.secret_key.get_secret_value()])
    async with db.connect() as conn:
        rows = await conn.execute(text("SELECT credential_type, value FROM data_source_credential"))
        tokens = {row.credential_type: row.value for row in rows}
    assert all(CANARY not in token for token in tokens.values())
    return {kind: box.decrypt(token) for kind, token in tokens.items()}


async def test_credentials_are_stored_encrypted_and_answered_masked(
    broker: Broker, db: AsyncEngine
) -> None:
    sid = await create(broker)
    path = f"/data-sources/{sid}/credentials"
    assert await ok(await broker.admin("GET", path)) == []
    put = await ok(await broker.admin("PUT", path, items(CLIENT_ID="client", CLIENT_SECRET=CANARY)))
    got = await ok(await broker.admin("GET", path))
    assert put == got
    assert [c["credential_type"] for c in got] == ["CLIENT_ID", "CLIENT_SECRET"]
    for credential in got:
        assert FIELDS <= credential.keys()
        assert credential["value"] == CREDENTIAL_MASK
        assert credential["data_source_id"] == sid
        assert credential["created_at"].endswith("+00:00")
    assert await stored(db, broker) == {"CLIENT_ID": "client", "CLIENT_SECRET": CANARY}


async def test_a_put_replaces_the_types_it_names_and_keeps_the_others(
    broker: Broker, db: AsyncEngine
) -> None:
    sid = await create(broker)
    path = f"/data-sources/{sid}/credentials"
    first = await ok(await broker.admin("PUT", path, items(CLIENT_ID="a", CLIENT_SECRET="b")))
    second = await ok(await broker.admin("PUT", path, items(CLIENT_SECRET="c", USERNAME="u")))
    assert [c["credential_type"] for c in second] == ["CLIENT_ID", "CLIENT_SECRET", "USERNAME"]
    before = {c["credential_type"]: c for c in first}
    after = {c["credential_type"]: c for c in second}
    assert after["CLIENT_ID"] == before["CLIENT_ID"]
    assert after["CLIENT_SECRET"]["credential_id"] == before["CLIENT_SECRET"]["credential_id"]
    assert after["CLIENT_SECRET"]["last_updated_at"] > before["CLIENT_SECRET"]["last_updated_at"]
    assert await stored(db, broker) == {"CLIENT_ID": "a", "CLIENT_SECRET": "c", "USERNAME": "u"}


@pytest.mark.parametrize(
    "body",
    [
        [{"credential_type": "API_KEY", "value": CANARY}],
        [{"credential_type": "CLIENT_SECRET", "value": [CANARY]}],
        [{"credential_type": "CLIENT_SECRET", "value": 12345}],
        [{"credential_type": "CLIENT_SECRET", "value": ""}],
        [{"credential_type": "CLIENT_SECRET", "value": CANARY, "extra": CANARY}],
        items(CLIENT_SECRET=CANARY) * 2,
        {"CLIENT_SECRET": CANARY},
    ],
    ids=["unknown-type", "list", "number", "empty", "unknown-field", "twice", "not-a-list"],
)
async def test_bad_credentials_are_422_without_echoing_values(
    broker: Broker, db: AsyncEngine, body: Any
) -> None:
    sid = await create(broker)
    answer = await broker.admin("PUT", f"/data-sources/{sid}/credentials", body)
    assert answer.status_code == 422, answer.text
    assert "detail" in answer.json()
    assert CANARY not in answer.text
    assert await stored(db, broker) == {}


async def test_credentials_are_scoped_to_the_project_and_need_the_token(broker: Broker) -> None:
    project = uuid.uuid4()
    sid = await create(broker, {**SPEC, "project_id": str(project)})
    path = f"/data-sources/{sid}/credentials"
    body = items(PASSWORD=CANARY)
    for method, json in (("GET", None), ("PUT", body)):
        for query in ("", f"?project_id={uuid.uuid4()}"):
            answer = await broker.admin(method, path + query, json)
            assert answer.status_code == 404, answer.text
        unknown = await broker.admin(method, f"/data-sources/{uuid.uuid4()}/credentials", json)
        assert unknown.status_code == 404
        for headers in ({}, {"Authorization": f"Bearer {ADMIN_TOKEN}x"}):
            refused = await broker.client.request(method, path, json=json, headers=headers)
            assert refused.status_code == 401
    await ok(await broker.admin("PUT", f"{path}?project_id={project}", body))
    assert len(await ok(await broker.admin("GET", f"{path}?project_id={project}"))) == 1


async def test_deleting_a_draft_deletes_its_credentials(broker: Broker, db: AsyncEngine) -> None:
    sid = await create(broker)
    await ok(await broker.admin("PUT", f"/data-sources/{sid}/credentials", items(USERNAME="u")))
    assert (await broker.admin("DELETE", f"/data-sources/{sid}")).status_code == 200
    assert await stored(db, broker) == {}
