"""The one Redis client, chosen by ``DATABROKER_REDIS_URL``.

- unset: in-process (fakeredis), for the embedded default;
- ``redis://``, ``rediss://``, ``unix://``: one server;
- ``redis+cluster://host:port[,host:port…]``: Redis Cluster, discovered from those nodes;
- ``redis+sentinel://host:port[,host:port…]/service_name[/db]``: the master Sentinel names.

Credentials go in the usual place (``redis+cluster://[user]:secret@host:port``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.sentinel import Sentinel

if TYPE_CHECKING:
    from proxy.settings import Settings

# Explicit timeouts: a hung Redis must cost a request milliseconds, not forever.
SOCKET_TIMEOUT = 1.0
CONNECT_TIMEOUT = 1.0
CLUSTER_SCHEME = "redis+cluster://"
SENTINEL_SCHEME = "redis+sentinel://"


def is_cluster(settings: Settings) -> bool:
    return (settings.redis_url or "").startswith(CLUSTER_SCHEME)


def tracks_invalidations(settings: Settings) -> bool:
    """One server (or Sentinel's master) can feed hot entries; a cluster or fakeredis cannot."""
    return settings.redis_url is not None and not is_cluster(settings)


@dataclass(frozen=True)
class _Nodes:
    password: str | None
    username: str | None
    nodes: list[tuple[str, int]]
    path: list[str]


def _parse_nodes(url: str, scheme: str) -> _Nodes:
    """``scheme[[user]:password@]host:port,host:port/path…``: the forms urllib cannot split."""
    rest = url[len(scheme) :]
    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        credentials, _, netloc = netloc.rpartition("@")
        user, _, secret = credentials.partition(":")
        username, password = unquote(user) or None, unquote(secret) or None  # an ACL user
    nodes = []
    for node in netloc.split(","):
        host, _, port = node.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{node!r} is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    return _Nodes(password, username, nodes, [p for p in path.split("/") if p])


def check_url(url: str) -> None:
    """ValueError unless ``url`` is one of the forms above (parsed only: nothing is dialled).

    The message never repeats the URL: it may hold a password.
    """
    forms = "redis://, rediss://, unix://, redis+cluster:// or redis+sentinel://"
    if url.startswith(CLUSTER_SCHEME):
        _parse_nodes(url, CLUSTER_SCHEME)
    elif url.startswith(SENTINEL_SCHEME):
        if not _parse_nodes(url, SENTINEL_SCHEME).path:
            raise ValueError("redis+sentinel:// needs /service_name")
    else:
        try:
            parse_url(url)
        except ValueError:
            raise ValueError(f"not a Redis URL: expected {forms}") from None


def create_redis(settings: Settings) -> Redis | RedisCluster:
    url = settings.redis_url
    if url is None:
        import fakeredis

        redis: Redis = fakeredis.FakeAsyncRedis()
        return redis
    timeouts: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": CONNECT_TIMEOUT,
    }
    if url.startswith(CLUSTER_SCHEME):
        parsed = _parse_nodes(url, CLUSTER_SCHEME)
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in parsed.nodes],
            username=parsed.username,
            password=parsed.password,
            **timeouts,
        )
    if url.startswith(SENTINEL_SCHEME):
        parsed = _parse_nodes(url, SENTINEL_SCHEME)
        db = int(parsed.path[1]) if len(parsed.path) > 1 else 0
        sentinel = Sentinel(parsed.nodes, sentinel_kwargs=timeouts, **timeouts)  # type: ignore[no-untyped-call]
        master: Redis = sentinel.master_for(
            parsed.path[0], username=parsed.username, password=parsed.password, db=db
        )
        return master
    return Redis.from_url(url, health_check_interval=30, max_connections=256, **timeouts)
