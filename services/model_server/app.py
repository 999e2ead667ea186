"""`create_app(settings)`: the FastAPI app, its error boundary (OpenAI error shape) and middleware."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import PayloadTooLarge, ServerError
from .schemas import ErrorResponse
from .service import Components, build_components
from .settings import ModelServerSettings

log = logging.getLogger(__name__)

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 429, 503)}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: ServerError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                        headers=exc.headers)


class BodyLimitMiddleware:
    """413 for a body over `limit` bytes, by Content-Length or by counting a streamed body."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLarge(f"request body over {self.limit} bytes")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await error_response(too_large)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise too_large
            return msg

        await self.app(scope, limited, send)


class MetricsMiddleware:
    """Counts requests by endpoint and status and times them to the last byte (streams included)."""

    def __init__(self, app: ASGIApp, components: Components, endpoints: set[str]) -> None:
        self.app, self.c, self.endpoints = app, components, endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in self.endpoints else "other"
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
            self.c.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            if endpoint not in ("/metrics", "/health", "/ready", "other"):
                self.c.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - t0)


def create_app(settings: ModelServerSettings, components: Components | None = None) -> FastAPI:
    """The model server app; `components` lets tests inject a tiny anchor, a fake bank client, etc."""
    from .api import router

    comps = components or build_components(settings)

    users = 0  # test clients may enter the lifespan more than once, nested: start once, stop at the last

    @asynccontextmanager
    async def lifespan(app: FastAPI):
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

    app = FastAPI(title="hiermem model server", version="0.1.0", lifespan=lifespan,
                  summary="OpenAI- and TGI-compatible generation with hierarchical parametric memory",
                  responses=_ERROR_RESPONSES)
    app.state.components = comps
    app.include_router(router)

    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], responses={503: {"model": ErrorResponse}})
    async def ready() -> Any:
        """Readiness: anchor loaded, engine running, bank reachable."""
        ok, reason = comps.ready_check()
        if not comps.engine.alive:
            ok, reason = False, "engine not running"
        if not ok:
            return JSONResponse(error_body(reason, "server_error", None, "not_ready"), status_code=503)
        return {"status": "ready", "models": comps.model_ids, "bank_id": comps.bank_id,
                **comps.engine.snapshot()}

    @app.get("/metrics", tags=["ops"])
    async def metrics() -> Response:
        """Prometheus metrics."""
        return Response(generate_latest(comps.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(ServerError)
    async def on_server_error(request: Request, exc: ServerError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        msg = str(first.get("msg", "invalid request"))
        return JSONResponse(error_body(f"{'.'.join(loc) or 'body'}: {msg}", "invalid_request_error",
                                       ".".join(loc) or None, "invalid_request"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), type_, None, str(exc.status_code)),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(error_body("internal error", "server_error", None, "internal_error"),
                            status_code=500)

    endpoints = {r.path for r in app.routes if hasattr(r, "path")}
    app.add_middleware(MetricsMiddleware, components=comps, endpoints=endpoints)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    return app
