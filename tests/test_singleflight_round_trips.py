"""What a miss and a hit on a cached source send to Redis, read by a real server's MONITOR.

A decision engine's misses are its normal load (every applicant is new), and each
Redis round trip is ~150 µs of the broker's CPU (redis-py's client): a leader's miss
is one GET, one script that looks for the entry once more and takes the lock, and one
that stores the entry and lets go of the lock. Commands a script runs inside Redis
are not round trips and are not counted.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from proxy.app import create_app
from proxy.keys import make_cache_key
from proxy.settings import Settings
from tests.conftest import Broker
from tests.instances import RedisInstance
from tests.servers import Upstream, serve_in_thread

pytestmark = pytest.mark.slow


@contextmanager
def monitored(redis: RedisInstance) -> Iterator[list[list[str]]]:
    """Every command clients send to ``redis`` while the block runs (not those its scripts
    run), each as its words; complete once the block has left."""
    sent: list[list[str]] = []
    end = f"monitored-end-{uuid.uuid4().hex}"
    client = redis.client()
    monitor = client.monitor().__enter__()
    ready = threading.Event()

    def read() -> None:
        ready.set()
        for command in monitor.listen():
            if end in command["command"]:
                return
            if command["client_type"] != "lua":
                sent.append(command["command"].split())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    ready.wait(timeout=10)
    try:
        yield sent
    finally:
        client.echo(end)
        reader.join(timeout=10)
        monitor.__exit__()
        client.close()
        assert not reader.is_alive(), "MONITOR never showed the end marker"


def touching(sent: list[list[str]], *names: str) -> list[str]:
    """The commands (their names) that name one of ``names`` (a key or a prefix of keys)."""
    return [
        words[0].upper() for words in sent if any(w.startswith(n) for w in words for n in names)
    ]


@pytest.mark.parametrize("hot", [False, True], ids=["hot-entries-off", "hot-entries-on"])
async def test_a_miss_is_three_round_trips_and_a_hit_one(
    settings: Settings,
    db: AsyncEngine,
    private_redis: RedisInstance,
    upstream: Upstream,
    hot: bool,
) -> None:
    url = upstream.answer("/applicant", b'{"score": 700}')
    served = settings.model_copy(
        update={"redis_url": private_redis.url, "hot_cache_max_bytes": 64 * 1024 if hot else 0}
    )
    with serve_in_thread(create_app(served)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            broker = Broker(base, served, client)
            spec = {
                "name": "bureau",
                "source": {"url": url + "?id={{ id }}", "response_type": "JSON"},
                "caching": {"enabled": True, "ttl": 60},
            }
            sid = (await broker.register(spec))["data_source_id"]
            assert (await broker.call("bureau", {"id": "warm-up"})).json()["origin"] == "REQUEST"
            key = make_cache_key(sid, {"id": "new"})
            entry = f"{served.redis_prefix}cache:{sid}:{key}"
            lock = f"{served.redis_prefix}lock:{sid}:{key}"
            with monitored(private_redis) as sent:
                miss = await broker.call("bureau", {"id": "new"})
            with monitored(private_redis) as sent_by_hit:
                hit = await broker.call("bureau", {"id": "new"})
    assert (miss.json()["origin"], hit.json()["origin"]) == ("REQUEST", "CACHE")
    # The lookup (with hot entries a script: the GET and its PTTL), the look-or-lock
    # script, the store-and-release script.
    lookup = ["EVAL"] if hot else ["GET"]
    assert touching(sent, entry, lock) == [*lookup, "EVAL", "EVAL"]
    # The entry's own store just invalidated any copy: the first hit reads Redis once.
    assert touching(sent_by_hit, entry, lock) == lookup
