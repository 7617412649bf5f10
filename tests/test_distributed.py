"""The cache on Redis Cluster and through Sentinel, and one upstream call per key
across several sidecar processes sharing Redis."""

from __future__ import annotations

import asyncio
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis as sync_redis
from prometheus_client import REGISTRY
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request
from starlette.responses import Response

from proxy.app import create_app
from proxy.redis_pool import _parse_nodes
from proxy.settings import Settings
from tests.conftest import REDIS_URL, Broker
from tests.harness import async_wait_for, free_port, register, sidecar_env, wait_for
from tests.instances import RedisCluster, RedisInstance, sidecar
from tests.servers import Upstream, serve_in_thread


@pytest.mark.parametrize(
    ("url", "password", "nodes", "path"),
    [
        ("redis+cluster://127.0.0.1:7000", None, [("127.0.0.1", 7000)], []),
        (
            "redis+cluster://:s%40cret@10.0.0.1:7000,10.0.0.2:7001/",
            "s@cret",
            [("10.0.0.1", 7000), ("10.0.0.2", 7001)],
            [],
        ),
        (
            "redis+sentinel://h1:26379,[::1]:26380/mymaster/2",
            None,
            [("h1", 26379), ("::1", 26380)],
            ["mymaster", "2"],
        ),
    ],
)
def test_node_lists_parse(
    url: str, password: str | None, nodes: list[tuple[str, int]], path: list[str]
) -> None:
    scheme = url.split("//")[0] + "//"
    parsed = _parse_nodes(url, scheme)
    assert (parsed.password, parsed.nodes, parsed.path) == (password, nodes, path)


def test_a_node_without_port_is_refused() -> None:
    with pytest.raises(ValueError, match="not host:port"):
        _parse_nodes("redis+cluster://127.0.0.1", "redis+cluster://")


@pytest.fixture
async def on_cluster(
    settings: Settings, db: AsyncEngine, redis_cluster: RedisCluster
) -> AsyncIterator[tuple[Broker, RedisCluster]]:
    nodes = ",".join(f"{h}:{p}" for h, p in redis_cluster.startup_nodes)
    clustered = settings.model_copy(update={"redis_url": f"redis+cluster://{nodes}"})
    with serve_in_thread(create_app(clustered)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            yield Broker(url, clustered, client), redis_cluster


async def test_cache_on_a_redis_cluster(
    on_cluster: tuple[Broker, RedisCluster], upstream: Upstream
) -> None:
    broker, cluster = on_cluster
    url = upstream.answer("/c/1", b'{"n": 1}')
    source = await broker.register(
        {
            "name": "clustered",
            "source": {"url": url.rsplit("/", 1)[0] + "/{{ n }}", "response_type": "JSON"},
            "caching": {"enabled": True, "ttl": 60},
        }
    )
    for n in range(1, 6):
        upstream.answer(f"/c/{n}", f'{{"n": {n}}}')
        origins = [
            (await broker.call("clustered", {"n": str(n)})).json()["origin"] for _ in range(2)
        ]
        assert origins == ["REQUEST", "CACHE"]
    client = sync_redis.RedisCluster(host="127.0.0.1", port=cluster.startup_nodes[0][1])
    try:
        keys = [k for k in client.scan_iter(match=f"{broker.settings.redis_prefix}cache:*")]
        assert len(keys) == 5
        sid = source["data_source_id"]
        assert all(
            k.decode().startswith(f"{broker.settings.redis_prefix}cache:{{{sid}}}:") for k in keys
        )
        assert len({client.keyslot(k) for k in keys}) == 1  # one source, one slot
        # Replacing the draft flushes its entries across the cluster.
        spec = {
            "name": "clustered",
            "source": {"url": f"{upstream.url}/c/{{{{ n }}}}", "response_type": "JSON"},
            "caching": {"enabled": True, "ttl": 60},
        }
        source_draft = await broker.register(spec | {"name": "clustered-draft"}, publish=False)
        await broker.call("clustered-draft", {"n": "1"})
        draft_id = source_draft["data_source_id"]
        assert (
            await broker.admin(
                "PUT", f"/data-sources/{draft_id}", spec | {"name": "clustered-draft"}
            )
        ).status_code == 200
        assert [k for k in client.scan_iter(match=f"*{{{draft_id}}}*")] == []
    finally:
        client.close()


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[tuple[RedisInstance, int]]:
    master = RedisInstance(tmp_path / "master")
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor dbmaster 127.0.0.1 {master.port} 1\n"
        "sentinel down-after-milliseconds dbmaster 5000\n"
    )
    process = None
    try:
        master.start()
        process = subprocess.Popen(
            ["redis-server", str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = sync_redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)

        def knows_master() -> bool:
            try:
                return (
                    client.execute_command("SENTINEL", "get-master-addr-by-name", "dbmaster")
                    is not None
                )
            except sync_redis.RedisError:
                return False

        wait_for(knows_master, timeout=20)
        client.close()
        yield master, port
    finally:
        if process is not None:
            process.kill()
            process.wait(timeout=10)
        master.kill()


async def test_cache_through_sentinel(
    settings: Settings, db: AsyncEngine, sentinel: tuple[RedisInstance, int], upstream: Upstream
) -> None:
    master, port = sentinel
    through = settings.model_copy(
        update={"redis_url": f"redis+sentinel://127.0.0.1:{port}/dbmaster"}
    )
    url = upstream.answer("/s", b'{"s": 1}')
    with serve_in_thread(create_app(through)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            broker = Broker(base, through, client)
            await broker.register(
                {
                    "name": "sentineled",
                    "source": {"url": url, "response_type": "JSON"},
                    "caching": {"enabled": True},
                }
            )
            origins = [(await broker.call("sentineled")).json()["origin"] for _ in range(2)]
            # Hot entries' invalidation link reached the master Sentinel names, too.
            await async_wait_for(lambda: REGISTRY.get_sample_value("databroker_hot_live") == 1)
    assert origins == ["REQUEST", "CACHE"]
    with master.client() as direct:
        assert len(list(direct.scan_iter(match=f"{settings.redis_prefix}cache:*"))) == 1


async def test_200_identical_misses_across_3_sidecars_make_one_call(
    pg_url: str, db: AsyncEngine, redis_prefix: str, upstream: Upstream, tmp_path: Path
) -> None:
    release = threading.Event()

    async def slow(_: Request) -> Response:
        await asyncio.to_thread(release.wait, 30)
        return Response(b'{"bureau": "report"}', media_type="application/json")

    url = upstream.on("/bureau", slow)
    # One environment (one secret key) for all three; only the outbox differs.
    env = sidecar_env(pg_url, REDIS_URL, tmp_path / "o1", redis_prefix=redis_prefix)
    async with (
        sidecar(env, tmp_path, max_connections=100) as one,
        sidecar(
            {**env, "DATABROKER_OUTBOX_DIR": str(tmp_path / "o2")}, tmp_path, max_connections=100
        ) as two,
        sidecar(
            {**env, "DATABROKER_OUTBOX_DIR": str(tmp_path / "o3")}, tmp_path, max_connections=100
        ) as three,
    ):
        await register(
            one.client,
            {
                "name": "bureau",
                "source": {"url": url, "response_type": "JSON", "timeout": 20},
                "caching": {"enabled": True},
            },
        )
        sidecars = [one, two, three]
        calls = [asyncio.create_task(sidecars[i % 3].call("bureau", {})) for i in range(200)]
        await async_wait_for(lambda: _hits_at_least(upstream, 1), timeout=20)
        release.set()
        answers = await asyncio.gather(*calls)
    assert [a.status_code for a in answers] == [200] * 200
    bodies = [a.json() for a in answers]
    assert upstream.hits("/bureau") == 1
    assert len({b["data_object_id"] for b in bodies}) == 1
    assert [b["origin"] for b in bodies].count("REQUEST") == 1


async def _hits_at_least(upstream: Upstream, count: int) -> bool:
    await asyncio.sleep(0.05)  # let the other sidecars' requests arrive and queue behind the lock
    return upstream.hits("/bureau") >= count
