"""The README's Redis ACL user, on a private redis-server: the broker works with it, nothing else does.

The ACL line and the flush command are read from the README, so the advice there is
the advice tested here.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
from pathlib import Path

import httpx
import pytest
import redis as sync_redis
from starlette.requests import Request
from starlette.responses import Response

from proxy.app import create_app
from proxy.settings import Settings
from tests.conftest import Broker
from tests.instances import RedisInstance
from tests.servers import Upstream, serve_in_thread

pytestmark = pytest.mark.slow

README = (Path(__file__).parent.parent / "README.md").read_text()
ACL_LINE = re.search(r"^ACL SETUSER databroker .*$", README, re.M)
FLUSH_LINE = re.search(r"^redis-cli --user databroker --scan .*$", README, re.M)


def flush_cache(redis: RedisInstance, password: str) -> None:
    """The README's operator flush, as that user, against the private server."""
    assert FLUSH_LINE is not None
    command = FLUSH_LINE.group(0).replace("redis-cli ", f"redis-cli -p {redis.port} ")
    env = {**os.environ, "REDISCLI_AUTH": password}
    done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, timeout=30)
    assert done.returncode == 0 and b"NOPERM" not in done.stdout + done.stderr, done


async def test_the_broker_works_as_the_acl_user_and_that_user_reaches_nothing_else(
    settings: Settings,
    private_redis: RedisInstance,
    upstream: Upstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert ACL_LINE is not None, "README lost its ACL SETUSER line"
    rule = shlex.split(ACL_LINE.group(0))
    password = next(r[1:] for r in rule if r.startswith(">"))
    admin = private_redis.client()
    admin.execute_command(*rule)
    admin.set("other:app", "theirs")

    failures = iter([500])

    async def flaky(_: Request) -> Response:
        return Response(b'{"n": 1}', next(failures, 200), media_type="application/json")

    url = upstream.on("/acl", flaky)
    as_user = settings.model_copy(
        update={
            "redis_url": f"redis://databroker:{password}@127.0.0.1:{private_redis.port}/0",
            "redis_prefix": "databroker:",
        }
    )
    caplog.set_level(logging.DEBUG)
    with serve_in_thread(create_app(as_user)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            broker = Broker(base, as_user, client)
            spec = {
                "name": "acl",
                "source": {"url": url, "response_type": "JSON"},
                "caching": {"enabled": True, "ttl": 60},
            }
            source = await broker.register(spec, publish=False)  # PUBLISH on the registry channel
            sid = source["data_source_id"]
            # The registry follower is subscribed (SUBSCRIBE is allowed on the prefix).
            assert admin.pubsub_numsub("databroker:events:registry") == [
                (b"databroker:events:registry", 1)
            ]
            failed = await broker.call("acl")  # single flight: lock, mark failed (EVAL)
            assert failed.json()["error"]["upstream_status"] == 500
            miss, hit = await broker.call("acl"), await broker.call("acl")  # lock, SET; GET
            assert (miss.json()["origin"], hit.json()["origin"]) == ("REQUEST", "CACHE")
            assert admin.keys(f"databroker:cache:{sid}:*")
            replaced = await broker.admin("PUT", f"/data-sources/{sid}", spec)  # SCAN, UNLINK
            assert replaced.status_code == 200, replaced.text
            assert admin.keys("databroker:cache:*") == []
            assert (await broker.call("acl")).json()["origin"] == "REQUEST"
            ready = await client.get("/readyz")
            assert ready.json()["redis"] == "ok", ready.text
    refused = [
        r for r in caplog.records if "NOPERM" in r.getMessage() or "Permission" in r.getMessage()
    ]
    assert refused == []
    assert not [r for r in caplog.records if "Redis unavailable" in r.getMessage()]

    assert admin.keys("databroker:cache:*")
    flush_cache(private_redis, password)
    assert admin.keys("databroker:cache:*") == []
    assert admin.get("other:app") == b"theirs"

    user = sync_redis.Redis(
        host="127.0.0.1", port=private_redis.port, username="databroker", password=password
    )
    try:
        for denied in (
            lambda: user.get("other:app"),
            lambda: user.unlink("other:app"),
            lambda: user.flushall(),
            lambda: user.keys("*"),
            lambda: user.publish("other", "x"),
            lambda: user.execute_command("FUNCTION", "FLUSH"),
            lambda: user.execute_command("CONFIG", "GET", "*"),
            lambda: user.eval("return redis.call('get', 'other:app')", 0),
        ):
            with pytest.raises(sync_redis.ResponseError, match=r"no permissions|can't access"):
                denied()
    finally:
        user.close()
        admin.close()
