"""Typed settings from ``DATABROKER_*`` environment variables, validated once at start.

Each value's form is checked here, so a bad one stops the process with one line
naming its variable; what a command needs beyond that (``serve`` needs a
complete configuration) it asks with ``check_serving``.

A pydantic model that reads the environment itself: pydantic-settings did only that
here (no .env file, no nested or JSON values), and cost the serving process 1.35 MiB
of heap (README "Footprint").
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from proxy.egress import ALLOW_VARIABLE, DENY_VARIABLE, Rules
from proxy.errors import StartupError
from proxy.redis_pool import check_url
from proxy.secrets import SecretKeyError, parse_keys
from proxy.source_spec import MAX_RETENTION_DAYS

MiB = 1024 * 1024
ENV_PREFIX = "DATABROKER_"
DATABASE_DRIVERS = ("postgresql+asyncpg", "sqlite+aiosqlite")
# A URL's scheme as SQLAlchemy reads it: its driver name.
_SCHEME = re.compile(r"^([\w+]+)://")


def _database_url(url: str | None) -> str | None:
    """The URL, if it names one of our async drivers; never echoed (a password)."""
    if url is None:
        return None
    forms = "postgresql+asyncpg://user@host:5432/db or sqlite+aiosqlite:///path"
    scheme = _SCHEME.match(url)
    if scheme is None:
        raise ValueError(f"not a database URL: expected {forms}")
    driver = scheme.group(1)
    if driver not in DATABASE_DRIVERS:
        raise ValueError(f"{driver}:// is not supported: expected {forms}")
    try:
        urlsplit(url).port  # noqa: B018 (it raises for a port or an IPv6 host it cannot read)
    except ValueError:
        raise ValueError(f"not a database URL (its host or port): expected {forms}") from None
    return url


def _redis_url(url: str | None) -> str | None:
    if url is not None:
        check_url(url)
    return url


def _secret_key(key: SecretStr | None) -> SecretStr | None:
    if key is not None:
        try:
            parse_keys(key.get_secret_value().split(","))
        except SecretKeyError as exc:
            raise ValueError(str(exc)) from None
    return key


def _rules(variable: str) -> BeforeValidator:
    """Parsed here, once: the egress policy is built from these rules, never from the text."""

    def parse(value: object) -> object:
        return Rules.parse(value, variable) if isinstance(value, str) else value

    return BeforeValidator(parse)


class Settings(BaseModel):
    """Each field from ``DATABROKER_`` + its name (in any case), unless given as an argument."""

    model_config = ConfigDict(
        extra="ignore", frozen=True, arbitrary_types_allowed=True, validate_default=True
    )

    # URLs may carry a password: never in repr (tracebacks, %r, test diffs).
    database_url: Annotated[str | None, AfterValidator(_database_url)] = Field(
        default=None, repr=False
    )
    redis_url: Annotated[str | None, AfterValidator(_redis_url)] = Field(default=None, repr=False)
    redis_prefix: str = "databroker:"
    admin_token: SecretStr | None = None
    secret_key: Annotated[SecretStr | None, AfterValidator(_secret_key)] = None
    project_id: uuid.UUID | None = None
    data_dir: Path = Path(".databroker")
    outbox_dir: Path | None = None
    # A database that stops answering holds a request (or start-up) this long, not
    # asyncpg's 60 s default: to connect, and then per statement.
    database_connect_timeout: float = Field(default=5.0, gt=0, le=600)
    database_command_timeout: float = Field(default=10.0, gt=0, le=3600)
    max_response_bytes: int = Field(default=10 * MiB, gt=0)
    default_timeout: float = Field(default=10.0, gt=0, le=600)
    outbox_flush_interval: float = Field(default=1.0, gt=0, le=60)
    outbox_batch_size: int = Field(default=2000, gt=0)
    outbox_max_bytes: int = Field(default=512 * MiB, gt=0)
    # In-process copies of cache entries, kept correct by Redis invalidations; 0 turns them off.
    hot_cache_max_bytes: int = Field(default=64 * MiB, ge=0)
    registry_refresh_interval: float = Field(default=30.0, gt=0)
    # Days DataObjects and audit rows are kept where a source sets no retention_days; unset: forever.
    retention_days: int | None = Field(default=None, ge=1, le=MAX_RETENTION_DAYS)
    # The background pruner: one sidecar of the fleet per interval, rows deleted a batch at a
    # time with a pause between batches, so the writer and the admin reads get their turns.
    prune_interval: float = Field(default=3600.0, gt=0)
    prune_batch_size: int = Field(default=1000, gt=0, le=100_000)
    prune_pause: float = Field(default=0.05, ge=0, le=60)
    # How often Redis and the database are checked for /readyz and databroker_dependency_up.
    dependency_check_interval: float = Field(default=2.0, gt=0, le=60)
    shutdown_grace: float = Field(default=15.0, ge=0)
    # Comma-separated CIDRs and host names, added to the built-in denies / winning over them.
    egress_deny: Annotated[Rules, _rules(DENY_VARIABLE)] = Rules()
    egress_allow: Annotated[Rules, _rules(ALLOW_VARIABLE)] = Rules()

    @model_validator(mode="before")
    @classmethod
    def _from_environment(cls, given: Any) -> Any:
        if not isinstance(given, dict):
            return given
        prefix = ENV_PREFIX.lower()
        found = {
            name.lower().removeprefix(prefix): value
            for name, value in os.environ.items()
            if name.lower().startswith(prefix)
        }
        return {**{k: v for k, v in found.items() if k in cls.model_fields}, **given}

    @field_validator(
        "database_url", "redis_url", "admin_token", "secret_key", "retention_days", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def embedded(self) -> bool:
        """No database configured: SQLite and in-process Redis, for a laptop."""
        return self.database_url is None

    def check_serving(self) -> None:
        """StartupError unless this is the embedded default (neither service set) or both are.

        Half a configuration is refused rather than completed with the embedded part:
        a production sidecar on the in-process Redis would cache alone, out of reach
        of every other sidecar and of redis-cli, while ``/readyz`` says ok.
        """
        given = {
            "DATABROKER_DATABASE_URL": self.database_url,
            "DATABROKER_REDIS_URL": self.redis_url,
        }
        missing = [name for name, value in given.items() if value is None]
        if len(missing) == 1:
            [present] = given.keys() - set(missing)
            raise StartupError(
                f"{missing[0]} is not set while {present} is: set both (production) "
                "or neither (the embedded default)"
            )

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'databroker.db'}"

    @property
    def resolved_outbox_dir(self) -> Path:
        return self.outbox_dir or self.data_dir / "outbox"
