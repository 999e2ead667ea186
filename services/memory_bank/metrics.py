"""Prometheus metrics of a bank shard server (served by `prometheus_client.start_http_server`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("hiermem_bank_requests", "RPCs finished, by method and status code", ["method", "code"])
ERRORS = Counter("hiermem_bank_errors", "RPCs that ended with an error, by method and status code",
                 ["method", "code"])
LATENCY = Histogram("hiermem_bank_request_seconds", "RPC duration until the last chunk is sent", ["method"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12))
INFLIGHT = Gauge("hiermem_bank_inflight", "RPCs being served")
BYTES_SENT = Counter("hiermem_bank_bytes_sent", "block payload bytes streamed, by level", ["level"])
BLOCKS_SENT = Counter("hiermem_bank_blocks_sent", "blocks streamed, by level", ["level"])
CACHE_HITS = Counter("hiermem_bank_cache_hits", "blocks served from the hot cache", ["level"])
CACHE_MISSES = Counter("hiermem_bank_cache_misses", "cacheable blocks read from the mapped files", ["level"])
CACHE_BYTES = Gauge("hiermem_bank_cache_bytes", "bytes held by the hot cache")
