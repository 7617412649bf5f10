"""proxy.routes.deferred: modules imported at the first request no earlier route takes, then
routed like any other (404 and 405 included)."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from proxy.app import ADMIN_MODULES, ADMIN_PREFIXES
from proxy.routes.answers import exception_handlers
from proxy.routes.deferred import Deferred

LATER = """
from starlette.responses import PlainTextResponse
from starlette.routing import Route


async def item(request):
    return PlainTextResponse("item " + request.path_params["n"])


routes = [Route("/later/{n}", item, methods=["GET"], name="item")]
"""


async def early(_: Request) -> PlainTextResponse:
    return PlainTextResponse("early")


@pytest.fixture
def later(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A module of routes no test imported yet."""
    name = f"later_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(LATER)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


async def test_a_deferred_module_is_imported_by_the_first_request_it_may_take(later: str) -> None:
    deferred = Deferred(("/later/",), later)
    app = Starlette(
        routes=[Route("/early", early, methods=["POST"]), deferred],
        exception_handlers=exception_handlers,
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://broker") as client:
        assert (await client.post("/early")).text == "early"
        missing = await client.get("/nowhere")
        assert (missing.status_code, missing.json()["code"]) == (404, "NOT_FOUND")
        assert later not in sys.modules  # not under its prefix: no import

        assert (await client.get("/later/7")).text == "item 7"
        assert later in sys.modules
        assert app.url_path_for("item", n="3") == "/later/3"

        missing = await client.get("/later/7/more")
        assert (missing.status_code, missing.json()["code"]) == (404, "NOT_FOUND")
        wrong = await client.post("/later/7")
        assert (wrong.status_code, wrong.json()["code"]) == (405, "METHOD_NOT_ALLOWED")
        assert set(wrong.headers["allow"].split(", ")) == {"GET", "HEAD"}
        # An earlier route's method refused stays that route's 405.
        early_wrong = await client.get("/early")
        assert (early_wrong.status_code, early_wrong.headers["allow"]) == (405, "POST")


def test_every_admin_route_is_under_a_prefix_the_app_defers() -> None:
    for route in Deferred(ADMIN_PREFIXES, *ADMIN_MODULES).routes:
        assert isinstance(route, Route) and route.path.startswith(ADMIN_PREFIXES), route
