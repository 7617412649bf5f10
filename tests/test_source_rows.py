"""proxy.source_rows: the registry's plain-SQL read gives the rows SQLAlchemy's typed read
gives, on each database the broker runs on (real Postgres, a migrated SQLite file)."""

from __future__ import annotations

import uuid

from cryptography.fernet import Fernet
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.database import Database
from proxy.secrets import SecretBox
from proxy.source_rows import read_all, spec_of
from proxy.source_spec import DataSourceSpec
from proxy.source_store import CredentialValue, SourceStore, VariableValue, to_api

EVERY_FIELD = {
    "name": "every-field",
    "description": "all of it",
    "source": {
        "url": "https://x.example/{{ id }}/{{ env.KEY }}",
        "headers": {"X-Trace": "on"},
        "retry": {"max_retries": 2},
        "cost": {"amount": "0.35", "currency": "USD"},
    },
    "caching": {"enabled": True, "ttl": {"hours": 1}, "stale_if_error": 60},
    "retention_days": 30,
    "metadata": {"team": "risk", "tags": ["a", "b"]},
    "variables": ["KEY"],
}


async def test_a_read_row_is_the_row_sqlalchemy_reads(database: AsyncEngine) -> None:
    box = SecretBox([Fernet.generate_key().decode()])
    store = SourceStore(database, box)
    project = uuid.uuid4()
    written = await store.create(DataSourceSpec.model_validate(EVERY_FIELD), project)
    bare = await store.create(
        DataSourceSpec.model_validate(
            {
                **EVERY_FIELD,
                "name": "bare",
                "source": {"url": "https://x.example/"},
                "caching": {},
                "metadata": None,
                "variables": None,
                "retention_days": None,
                "description": None,
            }
        ),
        None,
    )
    await store.set_variables(
        written.data_source_id, [VariableValue(name="KEY", value="v")], project
    )
    credential = CredentialValue(credential_type="CLIENT_ID", value="id")
    await store.set_credentials(written.data_source_id, [credential], project)

    handle = Database(database.url.render_as_string(hide_password=False))
    try:
        sources, variables, credentials = await read_all(handle)
    finally:
        await handle.close()

    by_id = {row.data_source_id: row for row in sources}
    for typed in (
        await store.get(written.data_source_id, project),
        await store.get(bare.data_source_id, None),
    ):
        read = by_id[typed.data_source_id]
        assert spec_of(read) == spec_of(typed)
        assert to_api(read) == to_api(typed)
        assert read.last_updated_at == typed.last_updated_at
    assert [(v.data_source_id, v.name) for v in variables] == [(written.data_source_id, "KEY")]
    assert box.decrypt(variables[0].value) == "v"
    assert [(c.data_source_id, c.credential_type) for c in credentials] == [
        (written.data_source_id, "CLIENT_ID")
    ]
