"""Run the app under uvicorn; log `LISTENING host:port` once it serves; drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging

from memory_store import BankMismatch

from .settings import ModelServerSettings

log = logging.getLogger(__name__)


async def serve(settings: ModelServerSettings) -> None:
    import uvicorn

    from .app import create_app

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                # DRAINING (like LISTENING) tells a supervisor that /health is about to go away while
                # in-flight streams finish: it must not probe this process to death
                log.info("DRAINING: signal %d received, finishing in-flight requests", sig)
            super().handle_exit(sig, frame)

    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, lifespan="on", log_config=None,
                            access_log=False, timeout_graceful_shutdown=30)
    server = Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        log.info("LISTENING %s:%d", host, port)
    await task


def limit_malloc_arenas(n: int = 2) -> None:
    """Cap glibc's malloc arenas (as MALLOC_ARENA_MAX=n would). Each thread that allocates (uvicorn's
    worker threads, the engine) otherwise gets an arena of its own that keeps what it freed, and the
    server's RSS creeps up round after round (docs/model_server.md, "Memory footprint";
    tests/integration/test_footprint.py)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:  # pragma: no cover - not glibc
        return
    try:
        ctypes.CDLL(name).mallopt(-8, n)  # M_ARENA_MAX
    except (OSError, AttributeError):  # pragma: no cover - a libc without mallopt
        pass


def run(settings: ModelServerSettings) -> int:
    limit_malloc_arenas()
    try:
        asyncio.run(serve(settings))
    except BankMismatch as exc:  # the bank was built for another anchor (components.build_components)
        why = f"{exc}; serve it with the anchor it was built for, or rebuild the bank for this one"
        log.error("%s", why)
        raise SystemExit(f"hiermem serve-model: {why}") from None
    return 0
