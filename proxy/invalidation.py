"""The invalidation link: Redis tells this sidecar of every change under the cache prefix.

One dedicated connection turns on client tracking in broadcast mode for the
``{prefix}cache:`` names, redirected to itself, then subscribes to
``__redis__:invalidate``: RESP2 has no push messages, so Redis delivers the
invalidations as pub/sub messages, and a connection may be its own
redirection target. From then on Redis sends the name of every key written,
deleted, expired or evicted under the prefix, by any client, and a null on
FLUSHALL / FLUSHDB.

The hot entries are trusted only while this link is up. They go live once the
subscription is confirmed; on any failure they are dropped and stay off until
the link is back. A PING after ``heartbeat`` seconds of silence finds a peer
that went silent without closing the connection — while copies are held: with
none there is nothing a dead link could make stale, and an idle sidecar sends
nothing. The first copy kept is pinged for within a heartbeat, so a copy is
never trusted more than two heartbeats on a link that died, as before.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection

from proxy.hotcache import HotEntries
from proxy.metrics import HOT_INVALIDATIONS, HOT_LIVE
from proxy.outage import Outage

logger = logging.getLogger("databroker.invalidation")

CHANNEL = b"__redis__:invalidate"


class LinkLost(Exception):
    """Redis stopped answering the heartbeat."""


async def follow_invalidations(
    redis: Redis,
    tracked_prefix: str,
    hot: HotEntries[Any],
    heartbeat: float = 1.0,
    retry_interval: float = 0.5,
) -> None:
    """Keep ``hot`` in step with Redis; runs until cancelled, through any Redis outage."""
    outage = Outage(
        logger,
        "invalidation link lost (%s); hot entries off until it is back",
        "invalidation link restored; hot entries in use again",
    )
    while True:
        connection: AbstractConnection | None = None
        try:
            connection = _resp2_connection(redis)
            await _subscribe(connection, tracked_prefix)
            hot.start()
            HOT_LIVE.set(1)
            outage.recovered()
            await _apply(connection, hot, heartbeat)
        except Exception as exc:
            # Whatever broke the link, the copies are dropped (finally) and the link is
            # made again: this task must outlive anything Redis does.
            outage.failed(type(exc).__name__)
        finally:
            hot.stop()
            HOT_LIVE.set(0)
            if connection is not None:
                await connection.disconnect()
        await asyncio.sleep(retry_interval)


def _resp2_connection(redis: Redis) -> AbstractConnection:
    """A connection of the client's own kind (host, credentials, Sentinel's master), on RESP2.

    RESP2 because its pub/sub messages are plain replies that ``read_response``
    returns; RESP3 would hand them to the client's push-message handlers instead.
    """
    pool = redis.connection_pool
    kwargs = {**pool.connection_kwargs, "protocol": 2}
    # redis-py 8 may carry its maintenance notifications (RESP3 only) in the pool's
    # kwargs; turned off here. Older versions know no such argument and reject it.
    if "maint_notifications_config" in kwargs:
        kwargs["maint_notifications_config"] = None
    connection: AbstractConnection = pool.connection_class(**kwargs)
    return connection


async def _subscribe(connection: AbstractConnection, tracked_prefix: str) -> None:
    await connection.connect()  # type: ignore[no-untyped-call]
    await connection.send_command("CLIENT", "ID")
    client_id = await connection.read_response()
    await connection.send_command(
        "CLIENT", "TRACKING", "ON", "REDIRECT", client_id, "BCAST", "PREFIX", tracked_prefix
    )
    await connection.read_response()
    await connection.send_command("SUBSCRIBE", CHANNEL)
    await connection.read_response()


async def _apply(connection: AbstractConnection, hot: HotEntries[Any], heartbeat: float) -> None:
    """Apply invalidations as they come; returns only by raising."""
    awaiting_pong = False
    while True:
        message = await connection.read_response(timeout=heartbeat)
        if message is None:
            if awaiting_pong:
                raise LinkLost("no answer to the heartbeat")
            if not len(hot):
                continue  # nothing held: nothing to protect
            await connection.send_command("PING", check_health=False)
            awaiting_pong = True
            continue
        kind = message[0]
        if kind == b"pong":
            awaiting_pong = False
        elif kind == b"message" and message[1] == CHANNEL:
            names = message[2]
            if names is None:
                hot.invalidate_all()
                HOT_INVALIDATIONS.inc()
            else:
                hot.invalidate(name.decode(errors="replace") for name in names)
                HOT_INVALIDATIONS.inc(len(names))
