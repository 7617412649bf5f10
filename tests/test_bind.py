"""Where ``databroker serve`` listens: 127.0.0.1 by default, or a Unix socket only its user can use."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from proxy.cli import main
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
        await healthy_on(path, process, tmp_path)
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, oct(path.stat().st_mode)
        terminate(process)
    assert not path.exists()


async def test_unix_socket_shared_with_a_group(tmp_path: Path) -> None:
    """What a pod's worker container uses: the socket's group is one both containers have."""
    path = tmp_path / "b.sock"
    group = 65534 if os.geteuid() == 0 else os.getgid()  # as root: a group it is not in
    args = ["serve", "--uds", str(path), "--uds-mode", "0660", "--uds-group", str(group)]
    with databroker(args, clean_env(), tmp_path) as process:
        await healthy_on(path, process, tmp_path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o660, oct(path.stat().st_mode)
        assert path.stat().st_gid == group
        terminate(process)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--uds", "b.sock", "--uds-mode", "0666"], "no access for others"),
        (["--uds", "b.sock", "--uds-mode", "rw"], "no access for others"),
        (["--uds", "b.sock", "--uds-group", "no-such-group-here"], "no group named"),
        (["--uds-mode", "0660"], "apply to --uds"),
    ],
)
def test_bad_socket_options_are_refused(args: list[str], error: str) -> None:
    done = CliRunner().invoke(main, ["serve", *args])
    assert done.exit_code == 2 and error in done.output, done.output


async def healthy_on(path: Path, process: subprocess.Popen[bytes], cwd: Path) -> None:
    transport = httpx.AsyncHTTPTransport(uds=str(path))
    async with httpx.AsyncClient(transport=transport, base_url="http://databroker") as client:

        async def healthy() -> bool:
            assert process.poll() is None, f"databroker exited early:\n{log_of(cwd)}"
            try:
                return (await client.get("/healthz")).json() == {"status": "ok"}
            except httpx.TransportError:
                return False

        await async_wait_for(healthy, timeout=30)
