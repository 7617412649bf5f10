"""The application and its lifespan: process-wide effects stay with ``serve``; a failed
start-up is reported as one line, after what it opened is closed again."""

from __future__ import annotations

import gc
import signal
from typing import Any

import httpx
from cryptography.fernet import Fernet
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.app import create_app
from proxy.cli import _StartupGuard
from proxy.secrets import SecretBox
from proxy.settings import Settings
from proxy.source_spec import DataSourceSpec
from proxy.source_store import SourceStore, VariableValue
from tests.conftest import REDIS_URL
from tests.harness import free_port
from tests.servers import serve_in_thread


def test_the_app_leaves_the_collector_alone_and_calls_started_once(
    settings: Settings, db: AsyncEngine
) -> None:
    calls: list[int] = []
    with serve_in_thread(create_app(settings, started=lambda: calls.append(1))) as url:
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert calls == [1]
        # Freezing is process-wide: a test (or any embedding) that makes an app must not get it.
        assert gc.get_freeze_count() == 0
    assert calls == [1]


def test_serve_freezes_start_up_objects_once_started_and_hands_signals_back() -> None:
    """``serve``'s factory: SIGTERM ends a start-up at once; once started, uvicorn's
    handlers are back and what start-up allocated is out of the collector."""
    before = {sig: signal.getsignal(sig) for sig in _StartupGuard.SIGNALS}
    try:
        guard = _StartupGuard()
        assert all(signal.getsignal(sig) == guard._stop for sig in _StartupGuard.SIGNALS)
        assert gc.get_freeze_count() == 0
        guard.started()
        assert {sig: signal.getsignal(sig) for sig in _StartupGuard.SIGNALS} == before
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()
        for sig, handler in before.items():
            signal.signal(sig, handler)


async def lifespan(app: Any) -> list[dict[str, Any]]:
    """Drive the ASGI lifespan protocol as a server does; the messages the app sent."""
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "lifespan", "state": {}}, receive, send)
    return sent


async def test_a_failed_start_up_is_one_line_naming_the_variable(settings: Settings) -> None:
    unreachable = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/x"
    app = create_app(settings.model_copy(update={"database_url": unreachable}))
    [failed] = await lifespan(app)
    assert failed["type"] == "lifespan.startup.failed"
    [line] = failed["message"].splitlines()
    assert line.startswith("cannot reach the database of DATABROKER_DATABASE_URL: ")


async def test_half_a_configuration_does_not_start(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"redis_url": None}))
    [failed] = await lifespan(app)
    assert failed["type"] == "lifespan.startup.failed"
    assert "DATABROKER_REDIS_URL is not set" in failed["message"]
    assert REDIS_URL not in failed["message"]


async def test_a_stored_variable_no_key_decrypts_stops_start_up_in_one_line(
    settings: Settings, db: AsyncEngine
) -> None:
    written_with = SecretBox([Fernet.generate_key().decode()])
    store = SourceStore(db, written_with)
    spec = DataSourceSpec.model_validate(
        {"name": "s", "source": {"url": "http://127.0.0.1:9/", "headers": {"K": "{{ env.K }}"}}}
    )
    row = await store.create(spec, None)
    try:
        await store.set_variables(row.data_source_id, [VariableValue(name="K", value="v")], None)
        [failed] = await lifespan(create_app(settings))  # another key
    finally:
        # Brokers later in the session start on this database with keys of their own.
        await store.delete(row.data_source_id, None)
    assert failed["type"] == "lifespan.startup.failed"
    assert failed["message"] == "a stored variable cannot be decrypted with DATABROKER_SECRET_KEY"
