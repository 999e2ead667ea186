"""Admission order for waiting requests: plain FIFO, or subtree-aware with an aging bound.

The subtree-aware policy admits first the waiting request whose memory nodes overlap most (in bytes)
with the nodes already in the running batch, so the batch reads fewer distinct blocks per decode step
(DESIGN §8). A request that has waited longer than `max_wait_s` is admitted before any other, oldest
first, so nothing starves.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Literal, Protocol


class Waiting(Protocol):
    enqueued_at: float
    memory_nodes: Mapping[Hashable, int]  # node key -> bytes of its block


class Scheduler:
    """Picks which waiting requests join the batch when slots free up."""

    def __init__(self, mode: Literal["subtree", "fifo"] = "subtree", max_wait_s: float = 2.0) -> None:
        if mode not in ("subtree", "fifo"):
            raise ValueError(f"unknown scheduler mode {mode!r}")
        self.mode = mode
        self.max_wait_s = max_wait_s

    def pick(self, waiting: Sequence[Waiting], running_nodes: set[Hashable], n: int,
             now: float) -> list[Waiting]:
        """Up to `n` requests of `waiting` (kept in arrival order) to admit now, in admission order."""
        pool = list(waiting)
        chosen: list[Waiting] = []
        nodes = set(running_nodes)
        while pool and len(chosen) < n:
            best = self._best(pool, nodes, now)
            pool.remove(best)
            chosen.append(best)
            nodes.update(best.memory_nodes)
        return chosen

    def _best(self, pool: list[Waiting], nodes: set[Hashable], now: float) -> Waiting:
        oldest = min(pool, key=lambda w: w.enqueued_at)
        if self.mode == "fifo" or now - oldest.enqueued_at >= self.max_wait_s or not nodes:
            return oldest

        def shared(w: Waiting) -> tuple[int, float]:
            return (sum(b for key, b in w.memory_nodes.items() if key in nodes), -w.enqueued_at)

        return max(pool, key=shared)
