"""Announcements: what one sidecar changes, the others hear at once, on one Redis connection.

A sidecar keeps some fleet-wide state in memory (the registry's index of sources, the
vendors' pauses and holds) so that its hot path never asks for it. A sidecar that
changes such state announces it on a pub/sub channel; every sidecar subscribes to all
of them on one connection and brings its copy up to date when a message comes. An idle
sidecar then costs Redis nothing — no polling — and hears of a change in one round trip.

Pub/sub is at most once: a message published while a sidecar's subscription is down
never reaches it. So each follower also names a ``resync`` that rereads its state in
full, run

- each time a subscription to its channel is confirmed — the first one, and any
  redis-py makes again by itself after a reconnect: whatever was announced while this
  sidecar was not listening is read then;
- every ``safety_interval`` seconds, for a message lost without the connection dropping
  (a publisher that wrote its change and lost Redis before it published, a subscription
  silently dead): that interval bounds how late such a change is seen.

A follower's handling never runs twice at once, and messages that arrive meanwhile are
folded into one more run after it: each run rereads the state, so the last one sees
every change announced before it started, in whatever order the messages came.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from proxy.cache import RedisClient
from proxy.outage import Outage

logger = logging.getLogger("databroker.announcements")

RETRY_INTERVAL = 1.0
"""Seconds between attempts to subscribe while Redis is away."""


@dataclass(frozen=True, slots=True)
class Follower:
    """One kind of fleet-wide state kept in memory: its channel and how to reread it."""

    name: str
    channel: str
    resync: Callable[[], Awaitable[object]]
    """Rereads the state in full; run on a message, on (re)subscribing, and on the timer."""
    safety_interval: float


class _Runner:
    """Runs one follower's resync, one at a time, folding requests that arrive meanwhile."""

    def __init__(self, follower: Follower) -> None:
        self.follower = follower
        self.due = time.monotonic() + follower.safety_interval
        self._wanted = False
        self._task: asyncio.Task[None] | None = None

    def request(self) -> None:
        self.due = time.monotonic() + self.follower.safety_interval
        self._wanted = True
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"{self.follower.name} resync")

    async def _run(self) -> None:
        try:
            while self._wanted:
                self._wanted = False
                try:
                    await self.follower.resync()
                except Exception:
                    # The next message or the timer tries again: the state stays as it was.
                    logger.exception("%s could not be read again", self.follower.name)
        finally:
            self._task = None

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def listen(
    redis: RedisClient, followers: Sequence[Follower], retry_interval: float = RETRY_INTERVAL
) -> None:
    """Subscribe to every follower's channel and keep each copy up to date; runs until
    cancelled, through any Redis outage (the timers go on meanwhile)."""
    runners = {follower.channel.encode(): _Runner(follower) for follower in followers}
    outage = Outage(
        logger,
        "announcements not heard (%s); fleet-wide state is read again every few seconds",
        "announcements heard again",
    )
    try:
        while True:
            try:
                async with redis.pubsub() as pubsub:
                    await pubsub.subscribe(*runners)
                    await _hear(pubsub, runners)
            except Exception as exc:
                # This task must outlive anything Redis does; the timers cover the gap.
                if not isinstance(exc, RedisError | OSError):
                    logger.warning("announcement subscription failed: %s", type(exc).__name__)
                outage.failed(type(exc).__name__)
                await _wait_resyncing(runners.values(), retry_interval)
    finally:
        await asyncio.gather(*(runner.stop() for runner in runners.values()))


async def _hear(pubsub: Any, runners: dict[bytes, _Runner]) -> None:
    """Dispatch messages and run what is due; returns only by raising.

    ``pubsub``: redis-py's, of a server or of a cluster (typed apart, used alike)."""
    while True:
        timeout = max(min(r.due for r in runners.values()) - time.monotonic(), 0.0)
        # A finite timeout: redis-py before 6 reads a blocking get_message under the
        # socket timeout, and would fail every second on a quiet channel.
        message = await pubsub.get_message(timeout=timeout)
        if message is not None:
            runner = runners.get(message["channel"])
            if runner is not None and message["type"] in ("message", "subscribe"):
                runner.request()
        _request_due(runners.values())


async def _wait_resyncing(runners: Iterable[_Runner], seconds: float) -> None:
    """Sleep ``seconds``, running the timers that fall due meanwhile."""
    pending = list(runners)
    deadline = time.monotonic() + seconds
    while (now := time.monotonic()) < deadline:
        await asyncio.sleep(min(deadline, min(r.due for r in pending)) - now)
        _request_due(pending)


def _request_due(runners: Iterable[_Runner]) -> None:
    now = time.monotonic()
    for runner in runners:
        if runner.due <= now:
            runner.request()
