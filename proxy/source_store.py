"""Where data sources, their variables and their credentials are kept: the database tables
the admin routes change.

Every write goes through here and follows proxy.lifecycle; the registry reads
the same tables to build its in-memory index.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import ColumnElement, Row, Table, delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.dml import Insert, Update

from proxy.auth import CredentialType
from proxy.errors import Conflict, NotFound, Refused, ValidationFailed
from proxy.lifecycle import forbidden_changes, resolve_names
from proxy.retry import Retrying
from proxy.secrets import SecretBox
from proxy.source_rows import SourceRow, spec_of
from proxy.source_spec import MAX_NAME_LENGTH, DataSourceSpec, RetryPolicy
from proxy.tables import data_source, data_source_credential, data_source_env_var
from proxy.templates import TemplateError
from proxy.timestamps import iso_utc
from proxy.types import Status


class VariableValue(BaseModel):
    """One item of ``PUT /data-sources/{id}/variables``."""

    model_config = ConfigDict(extra="forbid")
    # No control characters: no declared name holds one, so such an item is malformed (422).
    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH, pattern=r"^[^\x00-\x1f\x7f]+$")
    value: str | int | float | bool | None = Field(default=None, repr=False)  # a secret


class CredentialValue(BaseModel):
    """One item of ``PUT /data-sources/{id}/credentials``."""

    model_config = ConfigDict(extra="forbid")
    credential_type: CredentialType
    # A secret: never in repr. Strict: a number or a list is refused, not turned into text.
    value: str = Field(min_length=1, max_length=8192, strict=True, repr=False)


CREDENTIAL_MASK = "********"
"""What every answer shows in place of a credential's value."""


def _source_in_force(stored: dict[str, Any]) -> dict[str, Any]:
    """``source`` with the fields the engine always sends: ``body`` (``{}``: none) and
    ``retry`` as the broker applies it."""
    retry = stored.get("retry")
    policy = None if retry is None else RetryPolicy.model_validate(retry)
    return {
        **stored,
        "body": stored.get("body", {}),
        "retry": Retrying.from_policy(policy).in_force(),
    }


def to_api(row: SourceRow) -> dict[str, Any]:
    """The reference's ``DataSource`` body (plus ``project_id``)."""
    caching: dict[str, Any] = {"enabled": row.caching_enabled, "ttl": row.caching_ttl}
    if row.caching_stale_if_error is not None:
        caching["stale_if_error"] = row.caching_stale_if_error
    answer: dict[str, Any] = {
        "data_source_id": str(row.data_source_id),
        "name": row.name,
        "description": row.description,
        "source": _source_in_force(row.source),
        "caching": caching,
        "metadata": row.meta,
        "runtime_params": row.runtime_params,
        "variables": row.variables,
        "status": row.status,
        "project_id": None if row.project_id is None else str(row.project_id),
        "created_at": iso_utc(row.created_at),
        "last_updated_at": iso_utc(row.last_updated_at),
    }
    # Only when set, as stale_if_error: a source that never opts in keeps the reference's shape.
    if row.retention_days is not None:
        answer["retention_days"] = row.retention_days
    return answer


def _checked(spec: DataSourceSpec, project_id: uuid.UUID | None) -> DataSourceSpec:
    """The spec with its names resolved, in ``project_id``."""
    try:
        runtime_params, variables = resolve_names(spec)
    except TemplateError as exc:
        raise Refused(str(exc)) from exc
    return spec.model_copy(
        update={
            "runtime_params": runtime_params,
            "variables": variables,
            "project_id": project_id,
        }
    )


def _columns(spec: DataSourceSpec, now: datetime) -> dict[str, Any]:
    """What a spec sets of its row (the id, status and created_at are the store's)."""
    return {
        "name": spec.name,
        "description": spec.description,
        "source": spec.source.model_dump(mode="json", exclude_none=True),
        "caching_enabled": spec.caching.enabled,
        "caching_ttl": spec.caching.ttl_seconds,
        "caching_stale_if_error": spec.caching.stale_if_error,
        "retention_days": spec.retention_days,
        "runtime_params": list(spec.runtime_params or ()),
        "variables": list(spec.variables or ()),
        "project_id": spec.project_id,
        "meta": spec.metadata,
        "last_updated_at": now,
    }


def _is_source(data_source_id: uuid.UUID) -> ColumnElement[bool]:
    return data_source.c.data_source_id == data_source_id


async def _stored(
    conn: AsyncConnection, table: Table, data_source_id: uuid.UUID, by: str
) -> dict[str, Row[Any]]:
    """A source's variables or credentials (``table``), by their ``by`` column."""
    rows = await conn.execute(select(table).where(table.c.data_source_id == data_source_id))
    return {getattr(row, by): row for row in rows}


async def _put(
    conn: AsyncConnection,
    table: Table,
    key: str,
    existing: Row[Any] | None,
    data_source_id: uuid.UUID,
    now: datetime,
    naming: dict[str, Any],
    **changed: Any,
) -> None:
    """Set ``changed`` on a source's ``existing`` variable or credential (found by its
    ``key`` column), or insert a new one, named by ``naming``, when there is none."""
    changed["last_updated_at"] = now
    if existing is None:
        new = {key: uuid.uuid4(), "data_source_id": data_source_id, "created_at": now}
        await conn.execute(insert(table).values(**new, **naming, **changed))
    else:
        column = table.c[key]
        await conn.execute(update(table).where(column == getattr(existing, key)).values(**changed))


async def _written(conn: AsyncConnection, statement: Insert | Update) -> SourceRow:
    """The source row ``statement`` writes, as written; Conflict if its name is taken."""
    try:
        written: SourceRow = (await conn.execute(statement.returning(data_source))).one()
    except IntegrityError as exc:
        raise Conflict("a data source with this name already exists in this project") from exc
    return written


class SourceStore:
    """Every method that names a source takes the project the request works in: a source
    of another project (the global namespace being ``None``) is NotFound, as if absent.

    Each method is one transaction (``engine.begin()``) or one read (``engine.connect()``).
    """

    def __init__(self, engine: AsyncEngine, box: SecretBox) -> None:
        self._engine = engine
        self._box = box

    async def _get(
        self, conn: AsyncConnection, data_source_id: uuid.UUID, project_id: uuid.UUID | None
    ) -> SourceRow:
        row = (await conn.execute(select(data_source).where(_is_source(data_source_id)))).first()
        if row is None or row.project_id != project_id:
            raise NotFound(f"no data source {data_source_id} in this project")
        return row

    async def _check_name_free(
        self, conn: AsyncConnection, spec: DataSourceSpec, own_id: uuid.UUID | None = None
    ) -> None:
        # Race window: two sidecars creating the same name at once both pass this
        # check; the partial unique index then rejects the second write (Postgres).
        c = data_source.c
        query = select(c.data_source_id).where(
            c.name == spec.name,
            c.project_id.is_(None) if spec.project_id is None else c.project_id == spec.project_id,
            c.status != "ARCHIVED",
        )
        if own_id is not None:
            query = query.where(c.data_source_id != own_id)
        if (await conn.execute(query)).first() is not None:
            raise Conflict(f"a data source named {spec.name!r} already exists in this project")

    async def create(self, spec: DataSourceSpec, project_id: uuid.UUID | None) -> SourceRow:
        spec = _checked(spec, project_id)
        now = datetime.now(UTC)
        made = insert(data_source).values(
            data_source_id=uuid.uuid4(), status="DRAFT", created_at=now, **_columns(spec, now)
        )
        async with self._engine.begin() as conn:
            await self._check_name_free(conn, spec)
            return await _written(conn, made)

    async def replace(
        self, data_source_id: uuid.UUID, spec: DataSourceSpec, project_id: uuid.UUID | None
    ) -> SourceRow:
        async with self._engine.begin() as conn:
            row = await self._get(conn, data_source_id, project_id)
            spec = _checked(spec, project_id)
            if row.status == "ARCHIVED":
                raise Conflict("an archived data source cannot change")
            if row.status == "PUBLISHED":
                fields = forbidden_changes(spec_of(row), spec)
                if fields:
                    raise Refused(
                        "a published data source may change only description, caching, "
                        "retention_days, source.timeout and source.retry; "
                        f"this request changes: {', '.join(fields)}",
                        fields=fields,
                    )
            await self._check_name_free(conn, spec, own_id=row.data_source_id)
            changed = update(data_source).where(_is_source(row.data_source_id))
            return await _written(conn, changed.values(**_columns(spec, datetime.now(UTC))))

    async def delete(
        self, data_source_id: uuid.UUID, project_id: uuid.UUID | None
    ) -> Status | None:
        """Hard-delete a draft, archive a published source; the new status (None if gone)."""
        async with self._engine.begin() as conn:
            row = await self._get(conn, data_source_id, project_id)
            if row.status == "DRAFT":
                # Its variables and credentials go with it (ON DELETE CASCADE).
                await conn.execute(delete(data_source).where(_is_source(row.data_source_id)))
                return None
            await conn.execute(
                update(data_source)
                .where(_is_source(row.data_source_id))
                .values(status="ARCHIVED", last_updated_at=datetime.now(UTC))
            )
            return "ARCHIVED"

    async def publish(self, data_source_id: uuid.UUID, project_id: uuid.UUID | None) -> SourceRow:
        async with self._engine.begin() as conn:
            row = await self._get(conn, data_source_id, project_id)
            if row.status == "ARCHIVED":
                raise Conflict("an archived data source cannot be published")
            if row.status == "DRAFT":
                published = (
                    update(data_source)
                    .where(_is_source(row.data_source_id))
                    .values(status="PUBLISHED", last_updated_at=datetime.now(UTC))
                )
                row = await _written(conn, published)
            return row

    async def get(self, data_source_id: uuid.UUID, project_id: uuid.UUID | None) -> SourceRow:
        async with self._engine.connect() as conn:
            return await self._get(conn, data_source_id, project_id)

    async def list_sources(
        self, project_id: uuid.UUID | None, include_archived: bool, status: Status | None
    ) -> list[SourceRow]:
        c = data_source.c
        query = select(data_source).where(
            c.project_id.is_(None) if project_id is None else c.project_id == project_id
        )
        if status is not None:
            query = query.where(c.status == status)
        elif not include_archived:
            query = query.where(c.status != "ARCHIVED")
        async with self._engine.connect() as conn:
            return list((await conn.execute(query.order_by(c.created_at))).all())

    async def rotate_secrets(self) -> tuple[int, int]:
        """Re-encrypt every stored variable and credential with the newest key; how many
        of each were.

        One transaction: a value no key decrypts (SecretKeyError) leaves every row as it was.
        """
        v, c = data_source_env_var, data_source_credential
        async with self._engine.begin() as conn:
            # FOR UPDATE (Postgres): an admin PUT of the same rows waits for this commit, so
            # it is not overwritten by the value read before it. A row inserted meanwhile is
            # not rotated, but was encrypted by a sidecar that already has the new key first.
            # SQLite has no row locks: a concurrent write makes this commit fail; run it again.
            variables = (await conn.execute(select(v).with_for_update())).all()
            rotated = 0
            for var in variables:
                if var.value is not None:
                    await conn.execute(
                        update(v)
                        .where(v.c.data_source_env_var_id == var.data_source_env_var_id)
                        .values(value=self._box.rotate(var.value))
                    )
                    rotated += 1
            credentials = (await conn.execute(select(c).with_for_update())).all()
            for credential in credentials:
                await conn.execute(
                    update(c)
                    .where(c.c.credential_id == credential.credential_id)
                    .values(value=self._box.rotate(credential.value))
                )
        return rotated, len(credentials)

    async def get_variables(
        self, data_source_id: uuid.UUID, project_id: uuid.UUID | None
    ) -> list[dict[str, Any]]:
        """Names and whether each is set; values never leave the store."""
        async with self._engine.connect() as conn:
            row = await self._get(conn, data_source_id, project_id)
            stored = await _stored(conn, data_source_env_var, row.data_source_id, "name")
        answer = []
        for name in sorted(set(row.variables) | stored.keys()):
            var = stored.get(name)
            answer.append(
                {
                    "name": name,
                    "value": None,
                    "is_set": var is not None and var.value is not None,
                    "created_at": var and iso_utc(var.created_at),
                    "last_updated_at": var and iso_utc(var.last_updated_at),
                }
            )
        return answer

    async def set_variables(
        self, data_source_id: uuid.UUID, desired: list[VariableValue], project_id: uuid.UUID | None
    ) -> None:
        """Make the stored variables exactly ``desired`` (the reference's desired-state PUT)."""
        names = [v.name for v in desired]
        if len(set(names)) != len(names):
            raise ValidationFailed("a variable is listed twice")
        now = datetime.now(UTC)
        t = data_source_env_var
        async with self._engine.begin() as conn:
            row = await self._get(conn, data_source_id, project_id)
            undeclared = sorted(set(names) - set(row.variables))
            if undeclared:
                raise Refused(
                    f"not variables of this data source: {', '.join(undeclared)}", names=undeclared
                )
            stored = await _stored(conn, data_source_env_var, row.data_source_id, "name")
            gone = [stored[name].data_source_env_var_id for name in stored.keys() - set(names)]
            if gone:
                await conn.execute(delete(t).where(t.c.data_source_env_var_id.in_(gone)))
            for item in desired:
                token = None if item.value is None else self._box.encrypt(item.value)
                await _put(
                    conn,
                    t,
                    "data_source_env_var_id",
                    stored.get(item.name),
                    row.data_source_id,
                    now,
                    {"name": item.name, "nullable": False},
                    value=token,
                )

    async def get_credentials(
        self, data_source_id: uuid.UUID, project_id: uuid.UUID | None
    ) -> list[dict[str, Any]]:
        """The stored credentials, each value masked: values never leave the store."""
        async with self._engine.connect() as conn:
            row = await self._get(conn, data_source_id, project_id)
            stored = await _stored(
                conn, data_source_credential, row.data_source_id, "credential_type"
            )
        return [
            {
                "credential_type": c.credential_type,
                "value": CREDENTIAL_MASK,
                "credential_id": str(c.credential_id),
                "data_source_id": str(c.data_source_id),
                "created_at": iso_utc(c.created_at),
                "last_updated_at": iso_utc(c.last_updated_at),
            }
            for _, c in sorted(stored.items())
        ]

    async def set_credentials(
        self,
        data_source_id: uuid.UUID,
        given: list[CredentialValue],
        project_id: uuid.UUID | None,
    ) -> None:
        """Store each given credential, replacing one of the same type; others stay.

        Unlike variables (a desired-state PUT), a credential left out is kept: rotating
        a client secret must not drop the client id beside it.
        """
        types = [c.credential_type for c in given]
        if len(set(types)) != len(types):
            raise ValidationFailed("a credential type is listed twice")
        now = datetime.now(UTC)
        t = data_source_credential
        async with self._engine.begin() as conn:
            row = await self._get(conn, data_source_id, project_id)
            stored = await _stored(
                conn, data_source_credential, row.data_source_id, "credential_type"
            )
            # Race window: two PUTs adding the same type at once both insert; the unique
            # constraint rejects the second insert, which answers 400 CONFLICT: send it again.
            try:
                for item in given:
                    await _put(
                        conn,
                        t,
                        "credential_id",
                        stored.get(item.credential_type),
                        row.data_source_id,
                        now,
                        {"credential_type": item.credential_type},
                        value=self._box.encrypt(item.value),
                    )
            except IntegrityError as exc:
                raise Conflict("the credentials changed meanwhile; send them again") from exc
