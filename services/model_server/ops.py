"""The ops routes: `/health` (liveness), `/ready` (readiness; the load figures only for whoever may read
metrics) and `/metrics` (Prometheus; behind a key with `metrics_auth = "key"`)."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .components import Components
from .error_handlers import error_body
from .errors import Forbidden, ServerError
from .schemas import ErrorResponse
from .settings import ModelServerSettings

log = logging.getLogger(__name__)

_PUBLIC_NOT_READY = {"engine not running", "no bank shard replica known", "ok"}
"""Not-ready reasons shown as they are; any other (it may name Redis or replica addresses) is logged and
answered as "bank client unavailable"."""


def ops_router(settings: ModelServerSettings, comps: Components) -> APIRouter:
    """The ops routes of one app, over its components."""
    router = APIRouter()
    last_not_ready: list[str] = [""]  # the detail is logged once per change, not once per probe

    def may_read_metrics(request: Request) -> bool:
        """Whether the caller may see metrics-like figures (always, unless `metrics_auth` is `key`)."""
        if settings.metrics_auth != "key":
            return True
        try:
            return comps.keys.authenticate(request.headers.get("authorization")).metrics
        except ServerError:
            return False

    @router.get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    # response_model=object: any JSON, documented as before (its keys depend on who asks; 503 returns its own)
    @router.get("/ready", tags=["ops"], responses={503: {"model": ErrorResponse}}, response_model=object)
    async def ready(request: Request) -> dict[str, object] | JSONResponse:
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

    @router.get("/metrics", tags=["ops"], responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}})
    async def metrics(request: Request) -> Response:
        """Prometheus metrics (with `metrics_auth = "key"`: for keys whose entry has `"metrics": true`)."""
        if settings.metrics_auth == "key":
            who = comps.keys.authenticate(request.headers.get("authorization"))
            if not who.metrics:
                raise Forbidden("this API key may not read /metrics", code="metrics_not_allowed")
        body = await asyncio.to_thread(generate_latest, comps.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return router
