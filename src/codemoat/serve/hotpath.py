"""The generation routes, reached without FastAPI's per-request routing.

Every completion and chat request went through FastAPI's router: a walk over the app's routes and
included routers, two `AsyncExitStack`s, a per-route exception wrapper, the endpoint's dependency
solving, operation spans and telemetry look-ups. For a route whose endpoint takes only the `Request`
(the `HOT_PATHS` routes authenticate inside, first thing, as their dependency did) none of that does
anything, and it cost ~0.15 ms before the first token of every request in `codemoat serve`
(perf_counter stamps, bundled model, one client).

`App` (the app's class) puts `HotRoutes` where the router was, inside every middleware and FastAPI's
exception layer: a request for such a route's exact path and method calls its endpoint directly, with
the scope keys the router would set (`route`, `endpoint`, `path_params`, `router`), and renders a
returned dict as FastAPI does (`jsonable_encoder`, the route's response class). Its errors reach the same
exception handlers. Any other request, and a hot path that another route's pattern also matches
(checked when the stack is built), goes to the router as before.
"""

from __future__ import annotations

import inspect
from typing import Any

from fastapi import FastAPI
from fastapi.datastructures import DefaultPlaceholder
from fastapi.encoders import jsonable_encoder
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.requests import Request
from starlette.responses import Response

#: the generation routes: only these are looked at (each must also be `_plain`, else the router serves it)
HOT_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/api/generate", "/api/chat", "/infill"})
#: FastAPI's own OpenTelemetry bridge, off: codemoat keeps its own metrics (`/metrics`), and with it on
#: every request looked up three global providers before the middleware stack (~20 us)
TELEMETRY_OFF = {"tracing": False, "metrics": False, "logs": False}


class App(FastAPI):
    """FastAPI, with `HotRoutes` in place of the router inside its middleware stack."""

    def __init__(self, **kw: Any):
        super().__init__(telemetry=TELEMETRY_OFF, **kw)

    def build_middleware_stack(self):
        stack = super().build_middleware_stack()
        layer = stack
        while getattr(layer, "app", None) is not None:  # the innermost layer calls the router
            if layer.app is self.router:
                table = hot_routes(self.routes)
                if table:
                    layer.app = HotRoutes(self.router, table)
                break
            layer = layer.app
        return stack


def _plain(ctx: Any) -> bool:
    """Whether FastAPI would just call this route's endpoint with the request and take what it returns."""
    d = ctx.dependant
    return (
        isinstance(ctx.original_route, APIRoute)
        and d is not None
        and d.request_param_name is not None
        and not (d.dependencies or d.path_params or d.query_params or d.header_params or d.cookie_params or d.body_params)
        and not (d.websocket_param_name or d.http_connection_param_name or d.response_param_name)
        and not (d.background_tasks_param_name or d.security_scopes_param_name)
        and not (ctx.dependencies or ctx.param_convertors)
        and ctx.response_field is None
        and isinstance(ctx.response_class, DefaultPlaceholder)
        and inspect.iscoroutinefunction(ctx.endpoint)
    )


def hot_routes(routes: list[Any]) -> dict[tuple[str, str], tuple[APIRoute, Any, type[Response], int | None]]:
    """(method, path) -> (route, endpoint, response class, status code) of the plain `HOT_PATHS` routes
    whose path no other route's pattern matches."""
    contexts = list(iter_route_contexts(routes))
    table: dict[tuple[str, str], tuple[APIRoute, Any, type[Response], int | None]] = {}
    for ctx in contexts:
        if ctx.path not in HOT_PATHS or not _plain(ctx):
            continue
        path = ctx.path
        others = [c for c in contexts if c is not ctx]
        if any(getattr(c, "path_regex", None) is None or c.path_regex.match(path) for c in others):
            continue  # the router decides: another route might be the one it picks
        for method in ctx.methods or ():
            table[(method, path)] = (ctx.original_route, ctx.endpoint, ctx.response_class.value, ctx.status_code)
    return table


class HotRoutes:
    """ASGI: the hot routes' endpoints directly, anything else through `router` (see the module docstring)."""

    def __init__(self, router: Any, table: dict[tuple[str, str], tuple[APIRoute, Any, type[Response], int | None]]):
        self.router, self.table = router, table

    async def __call__(self, scope, receive, send) -> None:
        hit = self.table.get((scope.get("method"), scope.get("path"))) if scope["type"] == "http" else None
        if hit is None or scope.get("root_path"):
            await self.router(scope, receive, send)
            return
        route, endpoint, response_class, status = hit
        scope.setdefault("router", self.router)
        scope.update(route=route, endpoint=endpoint, path_params={})
        response = await endpoint(Request(scope, receive, send))
        if not isinstance(response, Response):
            response = response_class(jsonable_encoder(response), **({"status_code": status} if status else {}))
        await response(scope, receive, send)
