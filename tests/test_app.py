"""The lifespan: start-up's objects are kept out of the collector while the app serves."""

from __future__ import annotations

import gc

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.app import create_app
from proxy.settings import Settings
from tests.servers import serve_in_thread


def test_start_up_objects_are_frozen_while_serving_and_released_at_shutdown(
    settings: Settings, db: AsyncEngine
) -> None:
    assert gc.get_freeze_count() == 0
    with serve_in_thread(create_app(settings)) as url:
        assert httpx.get(f"{url}/healthz").status_code == 200
        # Everything alive at start-up, the app's own state among it.
        assert gc.get_freeze_count() > 10_000
    assert gc.get_freeze_count() == 0
