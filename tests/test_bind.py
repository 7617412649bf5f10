"""Where ``databroker serve`` listens: 127.0.0.1 by default, or a Unix socket only its user can use."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import httpx
import pytest

from tests.harness import async_wait_for, clean_env
from tests.instances import databroker, log_of, serving, terminate

pytestmark = pytest.mark.slow


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on ``port``, read from /proc (no connect)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


async def test_tcp_listens_on_loopback_only_by_default(tmp_path: Path) -> None:
    async with serving(clean_env(), tmp_path) as (process, client):
        port = client.base_url.port
        assert port is not None
        assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1, little-endian hex
        terminate(process)


async def test_unix_socket_is_0600(tmp_path: Path) -> None:
    path = tmp_path / "b.sock"
    # A socket file left by a killed run, open to everyone: uvicorn would keep its mode.
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))
    path.chmod(0o777)

    with databroker(["serve", "--uds", str(path)], clean_env(), tmp_path) as process:
        transport = httpx.AsyncHTTPTransport(uds=str(path))
        async with httpx.AsyncClient(transport=transport, base_url="http://databroker") as client:

            async def healthy() -> bool:
                assert process.poll() is None, f"databroker exited early:\n{log_of(tmp_path)}"
                try:
                    return (await client.get("/healthz")).json() == {"status": "ok"}
                except httpx.TransportError:
                    return False

            await async_wait_for(healthy, timeout=30)
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, oct(path.stat().st_mode)
        terminate(process)
    assert not path.exists()
