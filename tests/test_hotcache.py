"""Hot entries, the pure half: what is kept, for how long, and what a crossing invalidation voids."""

from __future__ import annotations

import pytest

from proxy.hotcache import ENTRY_OVERHEAD, LARGEST_SHARE, HotEntries


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def hot(clock: Clock) -> HotEntries[str]:
    entries: HotEntries[str] = HotEntries(1_000_000, clock)
    entries.start()
    return entries


def read(hot: HotEntries[str], name: str, value: str, ttl_ms: int = -1) -> None:
    """A read from Redis that nothing crossed."""
    ticket = hot.watch(name)
    assert ticket is not None
    hot.keep(ticket, value, len(value), ttl_ms)


def test_a_read_is_kept_and_served(hot: HotEntries[str]) -> None:
    assert hot.get("a") is None
    read(hot, "a", "v1")
    assert hot.get("a") == "v1"
    assert len(hot) == 1
    assert hot.bytes == 2 + 1 + ENTRY_OVERHEAD


def test_nothing_is_kept_or_served_while_the_link_is_down(clock: Clock) -> None:
    hot: HotEntries[str] = HotEntries(1_000_000, clock)
    assert hot.watch("a") is None
    hot.start()
    read(hot, "a", "v1")
    hot.stop()
    assert not hot.live
    assert hot.get("a") is None
    assert hot.watch("a") is None


def test_an_invalidation_drops_the_copy(hot: HotEntries[str]) -> None:
    read(hot, "a", "v1")
    read(hot, "b", "v1")
    hot.invalidate(["a", "unknown"])
    assert hot.get("a") is None
    assert hot.get("b") == "v1"
    assert hot.bytes == 2 + 1 + ENTRY_OVERHEAD


def test_a_read_crossed_by_an_invalidation_of_its_name_is_not_kept(hot: HotEntries[str]) -> None:
    ticket = hot.watch("a")
    assert ticket is not None
    hot.invalidate(["a"])  # processed before the (older) GET reply
    hot.keep(ticket, "old", 3, -1)
    assert hot.get("a") is None
    read(hot, "a", "new")  # the next read, uncrossed, is kept
    assert hot.get("a") == "new"


def test_an_invalidation_of_another_name_does_not_void_a_read(hot: HotEntries[str]) -> None:
    ticket = hot.watch("a")
    assert ticket is not None
    hot.invalidate(["b"])
    hot.keep(ticket, "v1", 2, -1)
    assert hot.get("a") == "v1"


def test_concurrent_reads_of_one_name_are_all_voided_by_one_invalidation(
    hot: HotEntries[str],
) -> None:
    first, second = hot.watch("a"), hot.watch("a")
    assert first is not None and second is not None
    hot.invalidate(["a"])
    hot.keep(first, "old", 3, -1)
    third = hot.watch("a")  # starts after the invalidation, while ``second`` is in flight
    assert third is not None
    hot.keep(second, "old", 3, -1)
    assert hot.get("a") is None
    hot.keep(third, "new", 3, -1)
    assert hot.get("a") == "new"


@pytest.mark.parametrize("void", ["invalidate_all", "stop_start"])
def test_a_flush_or_a_reconnect_voids_every_read_in_flight(hot: HotEntries[str], void: str) -> None:
    read(hot, "kept", "v1")
    ticket = hot.watch("a")
    assert ticket is not None
    if void == "invalidate_all":
        hot.invalidate_all()
    else:
        hot.stop()
        hot.start()
    hot.keep(ticket, "old", 3, -1)
    assert hot.get("a") is None
    assert hot.get("kept") is None
    assert hot.bytes == 0


def test_a_failed_read_leaves_no_trace(hot: HotEntries[str]) -> None:
    ticket = hot.watch("a")
    assert ticket is not None
    hot.forget(ticket)
    read(hot, "a", "v1")
    assert hot.get("a") == "v1"


def test_a_copy_expires_with_its_redis_lifetime_counted_from_before_the_read(
    hot: HotEntries[str], clock: Clock
) -> None:
    ticket = hot.watch("a")
    assert ticket is not None
    clock.now += 0.4  # the round trip
    hot.keep(ticket, "v1", 2, 1000)  # PTTL 1000 ms, read at the start
    clock.now += 0.59
    assert hot.get("a") == "v1"
    clock.now += 0.01
    assert hot.get("a") is None
    assert hot.bytes == 0


def test_the_least_recently_used_copies_go_first(clock: Clock) -> None:
    size, names = 100, [f"n{i:02}" for i in range(10)]
    hot: HotEntries[str] = HotEntries(10 * (size + 3 + ENTRY_OVERHEAD), clock)
    hot.start()
    for name in names:
        read(hot, name, "x" * size)
    assert hot.get("n00") is not None  # n00 is now the most recently used
    read(hot, "n10", "x" * size)
    assert hot.get("n01") is None
    assert all(hot.get(name) is not None for name in [*names[2:], "n00", "n10"])
    assert hot.bytes <= hot.max_bytes


def test_a_copy_too_large_for_its_share_is_not_kept(hot: HotEntries[str]) -> None:
    large = "x" * (hot.max_bytes // LARGEST_SHARE)
    read(hot, "large", large)
    assert hot.get("large") is None
    read(hot, "small", "x")
    assert hot.get("small") == "x"


def test_a_prefix_is_dropped_now_and_its_reads_in_flight_voided(hot: HotEntries[str]) -> None:
    read(hot, "p:cache:s1:a", "v1")
    read(hot, "p:cache:s2:a", "v1")
    ticket = hot.watch("p:cache:s1:b")
    assert ticket is not None
    hot.invalidate_prefix("p:cache:s1:")
    hot.keep(ticket, "old", 3, -1)
    assert hot.get("p:cache:s1:a") is None
    assert hot.get("p:cache:s1:b") is None
    assert hot.get("p:cache:s2:a") == "v1"
