"""What the lifespan hands to the routes: every shared resource, typed, in one frozen object.

The lifespan puts it in the ASGI state under ``"services"``; uvicorn copies that
state into every request's scope.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from starlette.requests import Request

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from proxy.broker import Broker
    from proxy.cache import RedisCache, RedisClient
    from proxy.database import Database
    from proxy.erasure import Eraser
    from proxy.flushes import Flushes
    from proxy.readiness import Dependencies
    from proxy.secrets import SecretBox
    from proxy.settings import Settings
    from proxy.source_registry import Registry
    from proxy.source_store import SourceStore
    from proxy.writer import OutboxWriter


@dataclass(frozen=True)
class Services:
    settings: Settings
    database: Database
    box: SecretBox
    redis: RedisClient
    cache: RedisCache
    registry: Registry
    writer: OutboxWriter
    broker: Broker
    flushes: Flushes
    dependencies: Dependencies
    eraser: Eraser

    @property
    def engine(self) -> AsyncEngine:
        """SQLAlchemy's engine: the admin routes', made at their first use."""
        return self.database.engine

    @cached_property
    def sources(self) -> SourceStore:
        """The admin routes' store, made at their first use: it loads SQLAlchemy."""
        from proxy.source_store import SourceStore

        return SourceStore(self.engine, self.box)


def services(request: Request) -> Services:
    found: Services = request.scope["state"]["services"]
    return found
