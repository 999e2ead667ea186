#!/usr/bin/env python
"""Health probe of a bank shard that requires mutual TLS: grpc.health.v1 Check("") must answer SERVING.

    hiermem-grpc-tls-probe [HOST:PORT] [CERT_DIR]      # defaults 127.0.0.1:50051 and /certs

Presents CERT_DIR/shard.pem + shard.key (deploy/make-certs.sh makes the shard certificate usable as a
client too) and checks the server against CERT_DIR/ca.pem; exits 0 when serving, 1 otherwise. Imports
grpc only (no torch): answers in well under a second, like `python -m hiermem.launcher probe`.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    address = argv[1] if len(argv) > 1 else "127.0.0.1:50051"
    certs = Path(argv[2] if len(argv) > 2 else "/certs")
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    creds = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes(), (certs / "shard.key").read_bytes(),
                                         (certs / "shard.pem").read_bytes())
    with grpc.secure_channel(address, creds) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        except grpc.RpcError as exc:
            print(f"{address}: {exc.code().name}", file=sys.stderr)
            return 1
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
