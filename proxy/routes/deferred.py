"""Routes whose modules are imported at the first request that reaches them.

The admin routes' modules bring SQLAlchemy and the admin API's models, ~20 MiB of
RSS: a sidecar that only answers the broker route and its probes never imports
them (README "Footprint"). The first request that no route before these matches
(an admin request, a 404, a 405) imports them all; from then on they are routes
like the others, tried in their modules' order.
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
    """The ``routes`` of each module named, in order, imported when first tried."""

    def __init__(self, *modules: str) -> None:
        self.modules = modules
        self._routes: list[BaseRoute] | None = None

    @property
    def routes(self) -> list[BaseRoute]:
        if self._routes is None:
            self._routes = [route for name in self.modules for route in import_module(name).routes]
        return self._routes

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
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
