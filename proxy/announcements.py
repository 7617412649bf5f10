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

A follower may give a cheaper ``safety_check`` for these two cases, which rereads only
when it finds something missed (the registry compares a change count, one GET, before
reading the database).

A follower's handling never runs twice at once, and messages that arrive meanwhile are
folded into one more run after it: each run rereads the state, so the last one sees
every change announced before it started, in whatever order the messages came. A
follower whose messages carry the work itself (an erasure to repeat here) takes each in
turn instead, and has nothing to reread.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from proxy.cache import RedisClient
from proxy.outage import Outage

logger = logging.getLogger("databroker.announcements")

RETRY_INTERVAL = 1.0
"""Seconds between attempts to subscribe while Redis is away."""
QUIET_WAIT = 60.0
"""The longest one wait for a message lasts when no timer is due sooner."""


@dataclass(frozen=True, slots=True)
class Follower:
    """One kind of announcement: its channel, and what a sidecar does on hearing it."""

    name: str
    channel: str
    resync: Callable[[], Awaitable[object]] | None = None
    """Rereads the state in full; run on a message (unless ``on_message`` takes it), on
    (re)subscribing, and every ``safety_interval``."""
    safety_interval: float = math.inf
    on_message: Callable[[bytes], Awaitable[object]] | None = None
    """Takes each message itself, in order: an announcement that carries what to do
    (an erasure), not merely that something changed."""
    safety_check: Callable[[], Awaitable[object]] | None = None
    """What the timer runs instead of ``resync``, if given: a cheaper look that rereads
    only when it finds something missed."""


class _Runner:
    """Runs one follower's work, one piece at a time: its messages in order, and resyncs
    folded into one when several are asked for meanwhile."""

    def __init__(self, follower: Follower) -> None:
        self.follower = follower
        self.due = math.inf
        self._wanted = False
        self._check_wanted = False
        self._messages: deque[bytes] = deque()
        self._task: asyncio.Task[None] | None = None
        self._postpone()

    def _postpone(self) -> None:
        if self.follower.resync is not None:
            self.due = time.monotonic() + self.follower.safety_interval

    def resync(self) -> None:
        if self.follower.resync is not None:
            self._postpone()
            self._wanted = True
            self._start()

    def check(self) -> None:
        """Look for anything missed (on resubscribing, or once the safety interval passed
        without a resync): the cheaper safety check if there is one, else a resync."""
        if self.follower.safety_check is None:
            self.resync()
        else:
            self._postpone()
            self._check_wanted = True
            self._start()

    def hear(self, data: bytes) -> None:
        if self.follower.on_message is None:
            self.resync()
        else:
            self._messages.append(data)
            self._start()

    def _start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.follower.name)

    async def _run(self) -> None:
        follower = self.follower
        try:
            while self._messages or self._wanted or self._check_wanted:
                try:
                    if self._messages and follower.on_message is not None:
                        await follower.on_message(self._messages.popleft())
                    elif self._wanted and follower.resync is not None:
                        self._wanted = self._check_wanted = False
                        await follower.resync()
                    elif follower.safety_check is not None:
                        self._check_wanted = False
                        await follower.safety_check()
                except Exception:
                    # The state stays as it was; the next message or the timer tries again.
                    logger.exception("%s: an announcement could not be followed", follower.name)
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
                    outage.recovered()
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
        due = min(r.due for r in runners.values())
        # A finite timeout: redis-py before 6 reads a blocking get_message under the
        # socket timeout, and would fail every second on a quiet channel.
        timeout = min(max(due - time.monotonic(), 0.0), QUIET_WAIT)
        message = await pubsub.get_message(timeout=timeout)
        runner = None if message is None else runners.get(message["channel"])
        if runner is not None and message is not None:
            if message["type"] == "message":
                runner.hear(message["data"])
            elif message["type"] == "subscribe":
                runner.check()  # whatever was announced before this is read now
        _resync_due(runners.values())


async def _wait_resyncing(runners: Iterable[_Runner], seconds: float) -> None:
    """Sleep ``seconds``, running the timers that fall due meanwhile."""
    pending = list(runners)
    deadline = time.monotonic() + seconds
    while (now := time.monotonic()) < deadline:
        await asyncio.sleep(min(deadline, min(r.due for r in pending)) - now)
        _resync_due(pending)


def _resync_due(runners: Iterable[_Runner]) -> None:
    now = time.monotonic()
    for runner in runners:
        if runner.due <= now:
            runner.check()
