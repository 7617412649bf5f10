"""databroker-probe: exit 0 only for a 2xx, within its timeout, standard library only."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.probe import main, probe
from tests.harness import free_port
from tests.imports import loaded_beyond_stdlib
from tests.servers import serve_in_thread


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    async def answer(request: Request) -> Response:
        status = int(request.path_params["status"])
        return JSONResponse({"status": "degraded", "redis": "unavailable"}, status)

    app = Starlette(routes=[Route("/{status:int}", answer)])
    with serve_in_thread(app) as url:
        yield int(url.rsplit(":", 1)[1])


def test_a_2xx_passes_anything_else_fails_with_the_body(port: int) -> None:
    assert probe("/200", uds=None, host="127.0.0.1", port=port, timeout=5) == (
        0,
        '/200: 200 {"status":"degraded","redis":"unavailable"}',
    )
    status, line = probe("/503", uds=None, host="127.0.0.1", port=port, timeout=5)
    assert status == 1 and line.startswith("/503: 503 {") and "unavailable" in line


def test_no_answer_within_the_timeout_fails(tmp_path: Path) -> None:
    path = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX) as silent:  # accepts connections, never answers
        silent.bind(path)
        silent.listen()
        status, line = probe("/healthz", uds=path, host="", port=0, timeout=0.3)
    assert status == 1 and "no answer (TimeoutError" in line
    status, line = probe("/healthz", uds=None, host="127.0.0.1", port=free_port(), timeout=1)
    assert status == 1 and "no answer (ConnectionRefusedError" in line


@pytest.mark.parametrize("args", [["healthz"], ["/healthz", "--timeout", "0"], []])
def test_bad_arguments_exit_2(args: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2


def test_loads_only_the_standard_library() -> None:
    assert loaded_beyond_stdlib("proxy.probe") == {"proxy", "proxy.probe"}
