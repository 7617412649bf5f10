"""uvicorn's server, quiet when idle: its main loop wakes once a second, not ten times.

uvicorn's ``Server.main_loop`` sleeps 0.1 s between ticks, to refresh the ``Date``
header once a second and to notice the exit flag its signal handler sets: ten wake-ups
a second for a sidecar that serves nothing. A bare uvicorn app idles at ~0.13 % of a
core here for them alone, a third of what an idle sidecar spent in all. Here a tick is
a second — the ``Date`` header still changes each second — and the signal handler wakes
the loop at once, so SIGTERM and SIGINT are acted on as soon as before.

``serve --workers N`` keeps uvicorn's own server: its supervisor builds the workers'.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from types import FrameType
from typing import Any

import uvicorn

STARTUP_FAILURE = 3
"""uvicorn's exit status for a start-up that failed (``uvicorn.main``'s constant, moved
to ``uvicorn.config`` in later releases: named here for every version we allow)."""


class QuietServer(uvicorn.Server):
    TICK = 1.0
    """Seconds between two ticks when nothing wakes the loop earlier."""

    _loop: asyncio.AbstractEventLoop | None = None
    _wake: asyncio.Event | None = None

    async def main_loop(self) -> None:
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            # uvicorn counts tenths: each tick is a whole second's, so each refreshes Date.
            counter = (counter + 10) % 864_000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.TICK)
            should_exit = await self.on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self._loop is not None and self._wake is not None:
            # A signal handler may run between any two bytecodes of the loop's own:
            # only call_soon_threadsafe is safe to call from there.
            self._loop.call_soon_threadsafe(self._wake.set)


def run(app: str, **options: Any) -> None:
    """``uvicorn.run(app, **options)``, on the quiet server when there is one worker."""
    if options.get("workers", 1) > 1:
        uvicorn.run(app, **options)
        return
    server = QuietServer(uvicorn.Config(app, **options))
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)
