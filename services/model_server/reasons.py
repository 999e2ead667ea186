"""What a client may see of a request's memory object: the fixed `memory.reason` texts, written once here and
imported wherever a reason is set or checked, and `public_memory`, the filter every response's memory object
goes through (docs/model_server.md, "What a tenant sees")."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

from .auth import Principal
from .schemas import MemoryInfo

log = logging.getLogger(__name__)

NOT_ALLOWED_REASON: Final = "the API key allows no memory subtree"
NO_BANK_REASON: Final = "no memory bank configured"
GATED_REASON: Final = "no memory: the prompt matches no document of the bank (route gate)"
DELETED_REASON: Final = "the routed subtree was deleted from the bank: memory of the levels above it"
UNAVAILABLE_REASON: Final = "memory unavailable"
"""What a client sees of a reason that is not public and names no missing level."""

PUBLIC_REASONS: Final = frozenset({NOT_ALLOWED_REASON, NO_BANK_REASON, GATED_REASON, DELETED_REASON})
"""Reasons shown as they are: fixed texts that say nothing internal. Every other reason (it may hold
replica addresses, checksums, a gRPC status) is logged and replaced by `levels_unavailable` or
`UNAVAILABLE_REASON`."""


def levels_unavailable(missing: Sequence[int]) -> str:
    """What a client sees of a degraded answer: the levels whose blocks could not be fetched."""
    return f"memory levels {list(missing)} unavailable"


def public_memory(info: MemoryInfo, principal: Principal, request_id: str = "") -> MemoryInfo:
    """The memory object as the client sees it: `reason` from a fixed vocabulary (the detail, which may hold
    replica addresses or checksums, goes to the log), and cache hits/misses and fetch time only for a key
    allowed to see them (they tell what other tenants used recently)."""
    out = info.model_copy()
    if info.reason is not None and info.reason not in PUBLIC_REASONS:
        if info.degraded and info.path is not None:
            missing = [lv for lv in range(1, len(info.path) + 1) if lv not in info.levels]
            out.reason = levels_unavailable(missing)
        else:
            out.reason = UNAVAILABLE_REASON
        log.warning("request %s memory: %s", request_id or "-", info.reason)
    if not principal.telemetry:
        out.cache_hits = out.cache_misses = None
        out.fetch_ms = None
    return out
