"""The quiet server: uvicorn's, ticking once a second, woken at once by a signal."""

from __future__ import annotations

import asyncio
import signal

import uvicorn
from starlette.types import Receive, Scope, Send

from proxy.quiet_server import QuietServer
from tests.harness import async_wait_for


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    raise AssertionError("never called: no request is made")


async def test_a_signal_ends_the_main_loop_without_waiting_for_a_tick() -> None:
    """No tick is due for an hour: only the handler's wake-up can end the loop. (The loop
    alone: ``serve`` would re-raise the signal in this process once it returns.)"""
    config = uvicorn.Config(_app, lifespan="off")
    config.load()
    server = QuietServer(config)
    server.TICK = 3600
    ticking = asyncio.create_task(server.main_loop())
    try:
        # The first tick refreshed the Date header.
        await async_wait_for(lambda: server.server_state.default_headers, timeout=10)
        assert server.server_state.default_headers[0][0] == b"date"
        server.handle_exit(signal.SIGTERM, None)
        await asyncio.wait_for(ticking, timeout=10)
    finally:
        ticking.cancel()
