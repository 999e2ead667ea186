"""Admission order for waiting requests: plain FIFO, or subtree-aware with an aging bound.

The subtree-aware policy admits first the waiting request whose memory nodes overlap most (in bytes)
with the nodes already in the running batch, so the batch reads fewer distinct blocks per decode step
(DESIGN §8); among equals, the one that shares most with the other waiting requests (so the admissions
after it can share too), then the oldest. Nothing starves: a request that has been passed over `max_skips` times (by requests that
arrived after it), or that has waited `max_wait_s`, is admitted before any other, oldest first. The skip
bound is what holds under heavy load, when every request waits long: a bound in seconds alone would then
turn the policy back into FIFO.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Literal, Protocol, TypeVar


class Waiting(Protocol):
    enqueued_at: float
    skipped: int  # times a later arrival was admitted before it

    @property
    def memory_nodes(self) -> Mapping[Hashable, int]:
        """Node key -> bytes of its block."""


W = TypeVar("W", bound=Waiting)


class Scheduler:
    """Picks which waiting requests join the batch when slots free up."""

    def __init__(self, mode: Literal["subtree", "fifo"] = "subtree", max_wait_s: float = 30.0,
                 max_skips: int = 16) -> None:
        if mode not in ("subtree", "fifo"):
            raise ValueError(f"unknown scheduler mode {mode!r}")
        self.mode = mode
        self.max_wait_s = max_wait_s
        self.max_skips = max_skips

    def pick(self, waiting: Sequence[W], running_nodes: set[Hashable], n: int, now: float) -> list[W]:
        """Up to `n` requests of `waiting` to admit now, in admission order; counts the skips."""
        pool = list(waiting)
        chosen: list[W] = []
        nodes = set(running_nodes)
        while pool and len(chosen) < n:
            best = self._best(pool, nodes, now)
            pool.remove(best)
            chosen.append(best)
            nodes.update(best.memory_nodes)
            for w in pool:
                if w.enqueued_at < best.enqueued_at:
                    w.skipped += 1
        return chosen

    def _best(self, pool: list[W], nodes: set[Hashable], now: float) -> W:
        overdue = [w for w in pool if w.skipped >= self.max_skips or now - w.enqueued_at >= self.max_wait_s]
        if self.mode == "fifo" or overdue or not nodes:
            return min(overdue or pool, key=lambda w: w.enqueued_at)

        def score(w: Waiting) -> tuple[int, int, float]:
            shared = sum(b for key, b in w.memory_nodes.items() if key in nodes)
            # tie-break: bytes it shares with the other waiting requests, so the next admissions share too
            affinity = sum(b for o in pool if o is not w for key, b in o.memory_nodes.items()
                           if key in w.memory_nodes)
            return (shared, affinity, -w.enqueued_at)

        return max(pool, key=score)
