"""`create_app(settings)`: the FastAPI app, its error boundary (OpenAI error shape) and middleware."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import Forbidden, PayloadTooLarge, ServerError
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


_PUBLIC_NOT_READY = {"engine not running", "no bank shard replica known", "ok"}
_TYPE_ERRORS = {"literal_error", "string_type", "list_type", "int_type", "bool_type", "float_type", "dict_type",
                "model_type", "none_required"}
_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict", "literal"}
_FIELD_RE = re.compile(r"[a-z_][a-z0-9_]*")


def _param(loc: Sequence[Any]) -> str | None:
    """The request field an error is about, as a dotted path (`messages.0.content`): the location up to the
    first union-member tag pydantic adds (`str`, `list[int]`, `function-after[...]`, a model's name)."""
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(str(part))
        elif isinstance(part, str) and _FIELD_RE.fullmatch(part) and part not in _TYPE_TAGS:
            parts.append(part)
        else:
            break
    return ".".join(parts) or None


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

    last_not_ready: list[str] = [""]

    def may_read_metrics(request: Request) -> bool:
        """Whether the caller may see metrics-like figures (always, unless `metrics_auth` is `key`)."""
        if settings.metrics_auth != "key":
            return True
        try:
            return comps.keys.authenticate(request.headers.get("authorization")).metrics
        except ServerError:
            return False

    @app.get("/ready", tags=["ops"], responses={503: {"model": ErrorResponse}})
    async def ready(request: Request) -> Any:
        """Readiness: anchor loaded, engine running, bank reachable. The batch counts (load) are shown to
        whoever may read /metrics."""
        ok, reason = await asyncio.to_thread(comps.ready_check)
        if not comps.engine.alive:
            ok, reason = False, "engine not running"
        if not ok:
            public = reason if reason in _PUBLIC_NOT_READY else "bank client unavailable"
            if reason != last_not_ready[0]:  # the detail (addresses, errors) goes to the log, once per change
                log.warning("not ready: %s", reason)
                last_not_ready[0] = reason
            return JSONResponse(error_body(public, "server_error", None, "not_ready"), status_code=503)
        last_not_ready[0] = ""
        if not may_read_metrics(request):
            return {"status": "ready"}
        return {"status": "ready", "models": comps.model_ids, "bank_id": comps.bank_id,
                **comps.engine.snapshot()}

    @app.get("/metrics", tags=["ops"], responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}})
    async def metrics(request: Request) -> Response:
        """Prometheus metrics (with `metrics_auth = "key"`: for keys whose entry has `"metrics": true`)."""
        if settings.metrics_auth == "key":
            who = comps.keys.authenticate(request.headers.get("authorization"))
            if not who.metrics:
                raise Forbidden("this API key may not read /metrics", code="metrics_not_allowed")
        body = await asyncio.to_thread(generate_latest, comps.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(ServerError)
    async def on_server_error(request: Request, exc: ServerError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        # of a union's failed members, the one that got furthest into the value says most, and a specific
        # error (a value error, a limit) more than "should be a string"
        first = max(errors, key=lambda e: (len(e.get("loc", ())), e.get("type") not in _TYPE_ERRORS)) \
            if errors else {}
        loc = list(first.get("loc", ()))
        param = _param(loc[1:] if loc[:1] == ["body"] else loc)
        msg = str(first.get("msg", "invalid request"))
        if first.get("type") == "extra_forbidden":
            msg = "unknown field (not part of this API)"
        return JSONResponse(error_body(f"{param or 'body'}: {msg}", "invalid_request_error", param,
                                       "invalid_request"), status_code=400)

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

    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, components=comps)  # outermost: counts the 413s too
    return app
