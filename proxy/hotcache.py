"""Hot entries: in-process copies of the cache entries this sidecar reads, in front of Redis.

A hit served from here costs no round trip. The copies are only as good as
the invalidations that reach them (``proxy.invalidation`` feeds them from
Redis), so the rules are:

- nothing is kept, and nothing kept is served, unless the invalidation link
  is *live*; when it drops, every copy is dropped;
- a read from Redis is kept only if no invalidation of that name (or of
  everything) arrived while it was in flight: the reply might predate it;
- every copy also carries the entry's remaining Redis lifetime, counted from
  before the read, because Redis may announce an expiry late;
- at ``max_bytes`` the least recently used copies go first.

Pure: no I/O, the clock is injected.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")

# What a copy costs beyond its value and name: the record and the dict slot.
ENTRY_OVERHEAD = 300
# No single copy may take more than this share of the budget.
LARGEST_SHARE = 8


@dataclass(frozen=True, slots=True)
class Ticket:
    """A read of ``name`` from Redis in flight, as :meth:`HotEntries.watch` saw it start."""

    name: str
    epoch: int
    invalidations: int
    started_at: float


@dataclass(frozen=True, slots=True)
class _Copy(Generic[V]):
    value: V
    expires_at: float | None
    size: int


class HotEntries(Generic[V]):
    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self._clock = clock
        self._copies: OrderedDict[str, _Copy[V]] = OrderedDict()
        self._bytes = 0
        self._live = False
        # Bumped whenever every copy is dropped: a read that started before cannot be kept.
        self._epoch = 0
        # Names being read from Redis: [invalidations seen, reads in flight].
        self._reading: dict[str, list[int]] = {}

    @property
    def live(self) -> bool:
        return self._live

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._copies)

    def get(self, name: str) -> V | None:
        copy = self._copies.get(name)
        if copy is None:
            return None
        if copy.expires_at is not None and self._clock() >= copy.expires_at:
            self._drop(name)
            return None
        self._copies.move_to_end(name)
        return copy.value

    def watch(self, name: str) -> Ticket | None:
        """Call before reading ``name`` from Redis; ``None`` if the read may not be kept."""
        if not self._live:
            return None
        seen = self._reading.get(name)
        if seen is None:
            seen = self._reading[name] = [0, 0]
        seen[1] += 1
        return Ticket(name, self._epoch, seen[0], self._clock())

    def keep(self, ticket: Ticket, value: V, size: int, ttl_ms: int) -> None:
        """Call after the read: keep ``value`` unless an invalidation may have crossed it.

        ``size`` is the value's size in bytes; ``ttl_ms`` is Redis's PTTL of the
        name, read with the value (-1: no expiry).
        """
        invalidations = self._done(ticket)
        if not self._live or ticket.epoch != self._epoch or invalidations != ticket.invalidations:
            return
        size += len(ticket.name) + ENTRY_OVERHEAD
        if size * LARGEST_SHARE > self.max_bytes:
            return
        expires_at = None if ttl_ms < 0 else ticket.started_at + ttl_ms / 1000
        self._drop(ticket.name)
        self._copies[ticket.name] = _Copy(value, expires_at, size)
        self._bytes += size
        while self._bytes > self.max_bytes:
            self._drop(next(iter(self._copies)))

    def forget(self, ticket: Ticket) -> None:
        """Call instead of :meth:`keep` when the read failed."""
        self._done(ticket)

    def invalidate(self, names: Iterable[str]) -> None:
        """Redis says these names changed (written, deleted, expired or evicted)."""
        for name in names:
            self._drop(name)
            seen = self._reading.get(name)
            if seen is not None:
                seen[0] += 1

    def invalidate_prefix(self, prefix: str) -> None:
        """Drop the copies under ``prefix`` now: this sidecar flushed them itself."""
        self.invalidate([n for n in {*self._copies, *self._reading} if n.startswith(prefix)])

    def invalidate_all(self) -> None:
        """Redis was flushed (FLUSHALL, FLUSHDB)."""
        self._copies.clear()
        self._bytes = 0
        self._epoch += 1

    def start(self) -> None:
        """The link is up: invalidations flow from now on."""
        self.invalidate_all()
        self._live = True

    def stop(self) -> None:
        """The link is down: nothing kept can be trusted, nothing read can be kept."""
        self.invalidate_all()
        self._live = False

    def _drop(self, name: str) -> None:
        copy = self._copies.pop(name, None)
        if copy is not None:
            self._bytes -= copy.size

    def _done(self, ticket: Ticket) -> int:
        seen = self._reading[ticket.name]
        seen[1] -= 1
        if seen[1] == 0:
            del self._reading[ticket.name]
        return seen[0]
