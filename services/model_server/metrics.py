"""Prometheus metrics of one model server, in a registry of its own (several apps can live in one test)."""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_FETCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """All series the model server exports at `/metrics`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("hiermem_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("hiermem_request_latency_seconds", "End-to-end request latency",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("hiermem_ttft_seconds", "Time to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("hiermem_tokens", "Tokens processed", ["kind"], registry=r)
        self.queue_depth = Gauge("hiermem_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.batch_rows = Gauge("hiermem_batch_rows", "Sequences in the running batch", registry=r)
        self.distinct_memory_bytes = Gauge("hiermem_distinct_memory_bytes",
                                           "Distinct memory bytes read by the last decode step", registry=r)
        self.decode_steps = Counter("hiermem_decode_steps", "Decode steps run by the engine", registry=r)
        self.decode_rows = Counter("hiermem_decode_rows", "Rows decoded, summed over steps", registry=r)
        self.decode_seconds = Counter("hiermem_decode_seconds", "Time spent in decode steps", registry=r)
        self.decode_memory_bytes = Counter("hiermem_decode_memory_bytes",
                                           "Distinct memory bytes read, summed over decode steps", registry=r)
        self.rebuild_seconds = Counter("hiermem_memory_rebuild_seconds",
                                       "Time spent rebuilding the batch's MemoryBatch", registry=r)
        self.cache_hits = Counter("hiermem_block_cache_hits", "Block cache hits", ["level"], registry=r)
        self.cache_misses = Counter("hiermem_block_cache_misses", "Block cache misses", ["level"], registry=r)
        self.cache_bytes = Gauge("hiermem_block_cache_bytes", "Bytes held by the block cache",
                                 ["level"], registry=r)
        self.fetch_latency = Histogram("hiermem_fetch_seconds", "Block fetch latency per shard", ["shard"],
                                       buckets=_FETCH_BUCKETS, registry=r)
        self.fetched_blocks = Counter("hiermem_fetched_blocks", "Blocks requested from the bank, per shard and "
                                      "level-1 subtree", ["shard", "subtree"], registry=r)
        self.fetch_failures = Counter("hiermem_fetch_failures", "Blocks that could not be fetched",
                                      ["shard"], registry=r)
        self.degraded = Counter("hiermem_degraded_requests", "Requests served with fewer memory levels",
                                registry=r)
        self.rejected_replicas = Counter("hiermem_bank_replicas_rejected", "Bank shard replicas not used: "
                                         "they serve another bank version or shard layout", registry=r)
        self.routed = Counter("hiermem_routed_requests", "Requests with \"memory\": \"auto\", by outcome: memory "
                              "(a path was fetched), gated (the router's gate found no document near the prompt: "
                              "the anchor alone), not_allowed (the API key allows no subtree)", ["outcome"],
                              registry=r)
        self.route_latency = Histogram("hiermem_route_seconds", "Prompt routing (embed + descend)",
                                       buckets=_FETCH_BUCKETS, registry=r)
        self.cancelled = Counter("hiermem_cancelled_requests", "Requests cancelled by their client",
                                 registry=r)
        self.resident_bytes = Gauge("hiermem_resident_bytes", "Resident memory (RSS) of the model server process",
                                    registry=r)
        self.resident_bytes.set_function(resident_bytes)
        self.reserved_bytes = Gauge("hiermem_reserved_bytes", "Bytes the model runner holds, by part: weights, "
                                    "kv_cache (reserved; resident as tokens are stored), memory_slots",
                                    ["part"], registry=r)

    def track_reserved(self, parts: Callable[[], dict[str, int]]) -> None:
        """Export `parts()` (e.g. `LmRunner.reserved_bytes`) as hiermem_reserved_bytes{part}, read at scrape."""
        def reader(name: str) -> Callable[[], float]:
            return lambda: float(parts()[name])

        for name in parts():
            self.reserved_bytes.labels(part=name).set_function(reader(name))


def resident_bytes() -> float:
    """This process's resident set size in bytes (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        return 0.0
