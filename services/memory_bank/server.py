"""A grpc.aio server for one shard of a bank: MemoryBank + health + reflection, metrics, registration.

    server, port = create_server(settings)      # bound (port 0 -> a free port), not started
    await server.start(); ...; await server.shutdown()

`serve(settings)` is the process main loop: start, log `LISTENING host:port`, register in Redis, wait for
SIGTERM/SIGINT, then drain: NOT_SERVING, deregister, refuse new calls, let in-flight streams finish within
the grace period, exit.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .interceptor import ErrorInterceptor
from .registry import Registration, replica_record
from .servicer import SERVICE_NAME, MemoryBankServicer, method_handlers
from .settings import MAX_MESSAGE_BYTES, BankServerSettings

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),  # two replicas must never share a port by accident
]


class BankShardServer:
    """The running pieces of one shard replica; built by `create_server`."""

    def __init__(self, settings: BankServerSettings, bank, grpc_server: grpc.aio.Server, port: int,
                 servicer: MemoryBankServicer, health_servicer: health.HealthServicer) -> None:
        self.settings = settings
        self.bank = bank
        self.grpc = grpc_server
        self.port = port
        self.servicer = servicer
        self.health = health_servicer
        self.address = settings.resolved_advertise_address(port)
        self.registration: Registration | None = None

    async def start(self) -> None:
        """Starts serving, marks itself SERVING and registers in Redis (if configured)."""
        if self.settings.hot_cache_bytes and self.settings.hot_cache_preload:
            # Before serving: the cache belongs to the event loop once calls arrive.
            n = await asyncio.to_thread(self.servicer.preload_hot_cache)
            log.info("hot cache preloaded: %d blocks, %.1f MB", n, self.servicer.cache.nbytes / 1e6)
        await self.grpc.start()
        self.set_serving(True)
        if self.settings.redis_url:
            record = replica_record(self.bank.bank_id, self.servicer.shard_id, self.servicer.replica_id,
                                    self.address, self.servicer.owned)
            self.registration = Registration(self.settings.redis_url, record, self.settings.registry_ttl_s,
                                             self.settings.heartbeat_s)
            await self.registration.start()

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else \
            health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            self.health.set(service, status)

    async def shutdown(self, grace_s: float | None = None, drain_delay_s: float | None = None) -> None:
        """Drain: NOT_SERVING, deregister, (wait drain_delay_s), refuse new calls, finish in-flight ones
        within grace_s, stop."""
        grace = self.settings.grace_s if grace_s is None else grace_s
        delay = self.settings.drain_delay_s if drain_delay_s is None else drain_delay_s
        self.set_serving(False)
        if self.registration is not None:
            await self.registration.stop()
            self.registration = None
        if delay > 0:
            await asyncio.sleep(delay)
        await self.grpc.stop(grace)
        log.info("stopped serving shard %s", self.servicer.shard_id)


def create_server(settings: BankServerSettings, bank=None) -> tuple[BankShardServer, int]:
    """Builds and binds (does not start) a shard server; `bank` defaults to `Bank.open(settings.bank)`.

    Returns the server and the port it bound (the chosen one when settings.port is 0)."""
    if bank is None:
        from memory_store import Bank

        bank = Bank.open(settings.bank, readahead=settings.readahead,
                         mapped_budget_bytes=settings.mapped_budget_bytes)
    servicer = MemoryBankServicer(bank, settings.shard, settings.resolved_replica_id(), settings)
    server = grpc.aio.server(interceptors=[ErrorInterceptor(f"/{SERVICE_NAME}/")], options=CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers((method_handlers(servicer),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server)
    address = f"{settings.host}:{settings.port}"
    credentials = server_credentials(settings)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {settings.host}:{settings.port}")
    for service in ("", SERVICE_NAME):  # NOT_SERVING until start()
        health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    return BankShardServer(settings, bank, server, port, servicer, health_servicer), port


def server_credentials(settings: BankServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials when a certificate is configured; mutual TLS when a client CA is too."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=client_ca, require_client_auth=client_ca is not None)


def start_metrics(settings: BankServerSettings) -> int | None:
    """Starts the Prometheus HTTP endpoint if configured; returns its port."""
    if settings.metrics_port is None:
        return None
    from prometheus_client import start_http_server

    httpd, _ = start_http_server(settings.metrics_port, addr=settings.host)
    port = httpd.server_port
    log.info("METRICS %s:%d", settings.host, port)
    return port


async def serve(settings: BankServerSettings) -> None:
    """Runs one shard replica until SIGTERM or SIGINT, then drains and returns."""
    server, port = create_server(settings)
    start_metrics(settings)
    await server.start()
    log.info("serving bank %s (%s) shard %s (%d subtrees) as replica %s, advertised as %s",
             server.bank.bank_id, server.bank.dir, settings.shard, len(server.servicer.owned), server.servicer.replica_id,
             server.address)
    log.info("LISTENING %s:%d", settings.host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # DRAINING (like LISTENING) tells a supervisor not to probe this process to death while it drains
    log.info("DRAINING: signal received: draining, in-flight calls may finish (grace %.1fs)", settings.grace_s)
    await server.shutdown()
