"""Routes whose modules are imported at the first request that reaches them.

The admin routes' modules bring SQLAlchemy and the admin API's models, ~21 MiB of
RSS: a sidecar that only answers the broker route and its probes never imports
them (README "Footprint"). The first request under one of their path prefixes
that no route before these matches imports them all, on the event loop (~0.5 s
of CPU, once); from then on they are routes like the others, tried in their
modules' order. A request outside the prefixes (a scanner's, a balancer's check
of ``/``) never imports them: it is no route's, 404.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from starlette.datastructures import URLPath
from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import Receive, Scope, Send

# Where ``matches`` leaves the route it found, for ``handle``.
_FOUND = "databroker.deferred_route"


class Deferred(BaseRoute):
    """The ``routes`` of each module named, in order, imported when a request under one
    of ``prefixes`` first tries them; every path of theirs starts with one of those."""

    def __init__(self, prefixes: tuple[str, ...], *modules: str) -> None:
        self.prefixes = prefixes
        self.modules = modules
        self._routes: list[BaseRoute] | None = None

    @property
    def routes(self) -> list[BaseRoute]:
        if self._routes is None:
            self._routes = [route for name in self.modules for route in import_module(name).routes]
        return self._routes

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefixes):
            return Match.NONE, {}
        partial: tuple[Match, Scope] | None = None
        for route in self.routes:
            match, child = route.matches(scope)
            if match is Match.FULL:
                return match, {**child, _FOUND: route}
            if match is Match.PARTIAL and partial is None:
                partial = (match, {**child, _FOUND: route})
        return partial or (Match.NONE, {})

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        route: BaseRoute = scope[_FOUND]
        await route.handle(scope, receive, send)

    def url_path_for(self, name: str, /, **path_params: Any) -> URLPath:
        for route in self.routes:
            try:
                return route.url_path_for(name, **path_params)
            except NoMatchFound:
                pass
        raise NoMatchFound(name, path_params)
