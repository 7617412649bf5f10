"""The one Redis client: a real server from ``DATABROKER_REDIS_URL``, else in-process."""

from __future__ import annotations

from redis.asyncio import Redis

from proxy.settings import Settings

# Explicit timeouts: a hung Redis must cost a request milliseconds, not forever.
SOCKET_TIMEOUT = 1.0
CONNECT_TIMEOUT = 1.0


def create_redis(settings: Settings) -> Redis:
    if settings.redis_url is None:
        import fakeredis

        redis: Redis = fakeredis.FakeAsyncRedis()
        return redis
    return Redis.from_url(
        settings.redis_url,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        health_check_interval=30,
        max_connections=256,
    )
