"""Readiness: whether this process can serve, answered at once from the last checks.

A sidecar keeps answering while Redis or the database is away (from the upstream,
through the outbox), so their state is reported, never a reason to be unready: a
readiness that failed with a dependency shared by the fleet would take every pod out
of service at once. Unready means this process itself cannot take traffic: its
outbox is full. (Before start-up completes and once draining begins, uvicorn does not
listen at all, which a probe sees as a failure just the same.)

Dependencies are checked in the background, each check bounded by its own timeout,
and ``/readyz`` reads the last results: a dependency that hangs makes the next check
late, never the probe. A check runs when someone reads the results — a probe, a scrape
(``observe``) — and the last ones are ``interval`` old: a sidecar nobody asks checks
nothing, one probed every 10 s checks every 10 s. (``serve --workers N`` checks on a
timer instead, in every worker: see ``proxy.app``.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Literal

from proxy.metrics import DEPENDENCY_UP

State = Literal["ok", "degraded"]
Check = Callable[[], Awaitable[object]]

# A dependency slower than this to answer a PING or a SELECT 1 counts as degraded.
CHECK_TIMEOUT = 1.0


class Dependencies:
    """The last known state of each dependency, refreshed by ``run``.

    Start-up has just reached every dependency, so each starts as "ok".
    """

    def __init__(self, checks: Mapping[str, Check], interval: float) -> None:
        self.checks = dict(checks)
        self.interval = interval
        self.states: dict[str, State] = dict.fromkeys(self.checks, "ok")
        self.checked_at = time.time()
        self._checking: asyncio.Task[None] | None = None
        self._publish()

    def observe(self) -> None:
        """Someone is about to read the states: if the last check is ``interval`` old and
        none runs, start the next one in the background. The reader gets the last results
        at once; the next reader gets these."""
        if self._checking is None and time.time() - self.checked_at >= self.interval:
            self._checking = asyncio.create_task(self._check_once(), name="dependency check")

    async def _check_once(self) -> None:
        try:
            await self.check_all()
        finally:
            self._checking = None

    async def close(self) -> None:
        """Stop a check in flight (it ends within CHECK_TIMEOUT anyway)."""
        if self._checking is not None:
            self._checking.cancel()
            await asyncio.gather(self._checking, return_exceptions=True)

    async def run(self) -> None:
        """Check every dependency (concurrently), then wait ``interval``; until cancelled."""
        while True:
            await self.check_all()
            await asyncio.sleep(self.interval)

    async def check_all(self) -> None:
        names = list(self.checks)
        results = await asyncio.gather(*(self._check(self.checks[name]) for name in names))
        self.states = dict(zip(names, results, strict=True))
        self.checked_at = time.time()
        self._publish()

    @staticmethod
    async def _check(check: Check) -> State:
        """The check's state within CHECK_TIMEOUT: one still running then is cancelled and
        left to end on its own (a cancelled database query sends its cancel request on a
        new connection first), so that the other checks' states are not held back."""
        task = asyncio.ensure_future(check())
        task.add_done_callback(_retrieved)
        done, _ = await asyncio.wait({task}, timeout=CHECK_TIMEOUT)
        if not done:
            task.cancel()
            return "degraded"
        # Which failure it was is the broker's and the writer's to log (once per outage);
        # a probe's answer only needs the state.
        return "degraded" if task.cancelled() or task.exception() is not None else "ok"

    def _publish(self) -> None:
        for name, state in self.states.items():
            DEPENDENCY_UP.labels(dependency=name).set(1 if state == "ok" else 0)


def _retrieved(task: asyncio.Future[object]) -> None:
    """Mark a check's failure as seen: asyncio would log an abandoned one's at exit."""
    if not task.cancelled():
        task.exception()


def report(
    dependencies: Dependencies, outbox_full: bool, backlog_bytes: int
) -> tuple[int, dict[str, object]]:
    """``/readyz``'s status and body: 503 only for what stops this process from serving."""
    body: dict[str, object] = {
        "status": "unready" if outbox_full else "ready",
        **dependencies.states,
        "outbox": "full" if outbox_full else "ok",
        "outbox_backlog_bytes": backlog_bytes,
        "checked_seconds_ago": round(max(0.0, time.time() - dependencies.checked_at), 3),
    }
    return (503 if outbox_full else 200), body
