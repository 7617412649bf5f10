"""Typed settings from ``DATABROKER_*`` environment variables, validated once at start."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from proxy.egress import ALLOW_VARIABLE, DENY_VARIABLE, rules_validator

MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DATABROKER_", extra="ignore", frozen=True)

    # URLs may carry a password: never in repr (tracebacks, %r, test diffs).
    database_url: str | None = Field(default=None, repr=False)
    redis_url: str | None = Field(default=None, repr=False)
    redis_prefix: str = "databroker:"
    admin_token: SecretStr | None = None
    secret_key: SecretStr | None = None
    project_id: uuid.UUID | None = None
    data_dir: Path = Path(".databroker")
    outbox_dir: Path | None = None
    max_response_bytes: int = Field(default=10 * MiB, gt=0)
    default_timeout: float = Field(default=10.0, gt=0, le=600)
    outbox_flush_interval: float = Field(default=1.0, gt=0, le=60)
    outbox_batch_size: int = Field(default=2000, gt=0)
    outbox_max_bytes: int = Field(default=512 * MiB, gt=0)
    # In-process copies of cache entries, kept correct by Redis invalidations; 0 turns them off.
    hot_cache_max_bytes: int = Field(default=64 * MiB, ge=0)
    registry_refresh_interval: float = Field(default=30.0, gt=0)
    shutdown_grace: float = Field(default=15.0, ge=0)
    # Comma-separated CIDRs and host names, added to the built-in denies / winning over them.
    egress_deny: Annotated[str, AfterValidator(rules_validator(DENY_VARIABLE))] = ""
    egress_allow: Annotated[str, AfterValidator(rules_validator(ALLOW_VARIABLE))] = ""

    @field_validator("database_url", "redis_url", "admin_token", "secret_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def embedded(self) -> bool:
        """No database configured: SQLite and in-process Redis, for a laptop."""
        return self.database_url is None

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'databroker.db'}"

    @property
    def resolved_outbox_dir(self) -> Path:
        return self.outbox_dir or self.data_dir / "outbox"
