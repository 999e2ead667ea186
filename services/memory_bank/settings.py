"""Settings of one bank shard server: typed, read once at start-up from flags and `HIERMEM_BANK_*`."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# gRPC's default receive limit is 4 MiB; chunks stay well below it so no peer needs special options.
MAX_CHUNK_BYTES = 3 * 2**20
# Message size limit set explicitly on both ends: a chunk plus headroom for its header.
MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + 2**20


class BankServerSettings(BaseSettings):
    """`hiermem serve-bank`: every field is also a flag (`--max-nodes-per-call`) and an environment
    variable (`HIERMEM_BANK_MAX_NODES_PER_CALL`); flags win over the environment."""

    model_config = SettingsConfigDict(env_prefix="HIERMEM_BANK_", extra="forbid")

    bank: Path = Field(description="bank directory (manifest.json, tree.safetensors, shards/)")
    shard: str = Field(description="id of the shard this replica serves")
    host: str = Field("127.0.0.1", description="interface to listen on (0.0.0.0 for all)")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one (logged as LISTENING)")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Prometheus /metrics HTTP port; 0 picks a free one; unset = off")
    redis_url: str | None = Field(None, description="register in Redis for discovery (redis://host:port/0)")
    advertise_address: str | None = Field(
        None, description="host:port that clients should dial; default the bound host:port")
    replica_id: str | None = Field(None, description="id of this replica; default <hostname>-<pid>")
    hot_cache_bytes: int = Field(0, ge=0, description="bytes of shallow-level blocks kept in RAM (0 = off)")
    hot_cache_max_level: int = Field(1, ge=1, description="deepest level whose blocks the hot cache keeps")
    hot_cache_preload: bool = Field(
        True, description="fill the hot cache at start-up, before reporting SERVING (else as blocks are asked for)")
    readahead: bool = Field(
        False, description="also madvise(WILLNEED) each block before sending (its checksum thread reads ahead "
        "anyway; no gain measured here, and the call blocks the event loop)")
    mapped_budget_bytes: int = Field(
        2**30, ge=0, description="drop the mapped pages from this process after this many block bytes were "
        "read (bounds RSS; the page cache keeps them); 0 = never")
    prefetch_blocks: int = Field(
        2, ge=0, le=16, description="blocks of a call read ahead from disk while an earlier one is sent")
    max_nodes_per_call: int = Field(64, ge=1, description="most nodes one FetchBlocks call may ask for")
    max_bytes_per_call: int = Field(512 * 2**20, ge=1, description="most block bytes one call may ask for")
    chunk_bytes: int = Field(2**20, ge=4096, le=MAX_CHUNK_BYTES, description="payload bytes per chunk")
    registry_ttl_s: float = Field(10.0, gt=0, description="TTL of the Redis registration key")
    heartbeat_s: float = Field(3.0, gt=0, description="seconds between registration refreshes")
    drain_delay_s: float = Field(
        0.0, ge=0, description="on SIGTERM: seconds NOT_SERVING is shown before new calls are refused")
    grace_s: float = Field(10.0, ge=0, description="on SIGTERM: seconds in-flight streams may take to finish")
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain: serve over TLS (with the key)")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle: require client certificates signed by it (mutual TLS)")

    @model_validator(mode="after")
    def _check(self) -> BankServerSettings:
        if self.heartbeat_s >= self.registry_ttl_s:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s}) must be below registry_ttl_s "
                             f"({self.registry_ttl_s}), or the registration expires between heartbeats")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if self.advertise_address is not None and ":" not in self.advertise_address:
            raise ValueError(f"advertise_address must be host:port, got {self.advertise_address!r}")
        return self

    def resolved_replica_id(self) -> str:
        return self.replica_id or f"{socket.gethostname()}-{os.getpid()}"

    def resolved_advertise_address(self, bound_port: int) -> str:
        """Address others dial: the explicit one, else the bound host (the hostname for a wildcard)."""
        if self.advertise_address:
            return self.advertise_address
        host = self.host
        if host in ("0.0.0.0", "::", "[::]", ""):
            host = socket.gethostname()
        return f"{host}:{bound_port}"
