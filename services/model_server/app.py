"""`create_app(settings)`: the FastAPI app assembled from its parts (components.py), its routes (api.py,
ops.py), its error boundary (error_handlers.py: the OpenAI error shape) and its middleware (here)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .api import router as api_router
from .components import Components, build_components
from .error_handlers import ERROR_RESPONSES, error_response, install_error_handlers
from .errors import PayloadTooLarge
from .ops import ops_router
from .settings import ModelServerSettings

log = logging.getLogger(__name__)


class BodyLimitMiddleware:
    """413 for a body over `limit` bytes, however it is sent: by its Content-Length before reading, or, for
    a chunked body (or a Content-Length that lies), by counting while the middleware reads it. The body is
    read here in full (at most `limit` bytes are held) and replayed to the app, so the 413 never surfaces
    from inside the app's body parsing (which would turn any receive error into a 400)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = error_response(PayloadTooLarge(f"request body over {self.limit} bytes"))
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        seen = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client left before sending it all
                return
            chunk = msg.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                await too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: the disconnect, for streaming responses

        await self.app(scope, replay, send)


class MetricsMiddleware:
    """Counts requests by endpoint (the route's path template, `other` for no route) and status, and times
    them to the last byte (streams included)."""

    def __init__(self, app: ASGIApp, components: Components) -> None:
        self.app, self.c = app, components

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        t0 = time.perf_counter()

        async def send_wrapper(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # routing stores the matched route in the (shared) scope, included routers as well
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            self.c.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            if endpoint != "other":
                self.c.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - t0)


def _lifespan(comps: Components, settings: ModelServerSettings
              ) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Start the engine when the app starts serving, close the components when it stops. Test clients may
    enter the lifespan more than once, nested: start once, stop at the last."""
    users = 0

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal users
        users += 1
        if users == 1:
            comps.engine.start()
            log.info("model server ready: models %s, bank %s, scheduler %s", comps.model_ids, comps.bank_id,
                     settings.scheduler)
        try:
            yield
        finally:
            users -= 1
            if users == 0:
                comps.close()

    return lifespan


def create_app(settings: ModelServerSettings, components: Components | None = None) -> FastAPI:
    """The model server app; `components` lets tests inject a tiny anchor, a fake bank client, etc."""
    comps = components or build_components(settings)
    app = FastAPI(title="hiermem model server", version="0.1.0", lifespan=_lifespan(comps, settings),
                  summary="OpenAI- and TGI-compatible generation with hierarchical parametric memory",
                  responses=ERROR_RESPONSES)
    app.state.components = comps
    app.include_router(api_router)
    app.include_router(ops_router(settings, comps))
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, components=comps)  # outermost: counts the 413s too
    return app
