"""Admission order for waiting requests: plain FIFO, or subtree-aware with an aging bound.

The subtree-aware policy admits first the waiting request whose memory nodes overlap most (in bytes)
with the nodes already in the running batch, so the batch reads fewer distinct blocks per decode step
(docs/design.md §8); among equals, the one that shares most with the other waiting requests (so the admissions
after it can share too), then the oldest. Nothing starves: a request is *overdue*, and admitted before any
other (oldest first), once it has been passed over `max_skips` times by later arrivals, or has waited
`max_wait_s`, or has waited `wait_factor` times the recent mean wait (an exponential average over the
admitted requests). The relative bound is what keeps the tail of the time to first token near FIFO's
under any load (a bound in seconds alone would either never act or turn the policy back into FIFO), while
leaving the policy free to reorder the bulk of the queue; the skip bound caps the worst case in admissions.

Choice needs a queue: with one admission per freed slot the policy picks one request at a time, against
a batch it cannot change. `admit_group` (subtree only) lets the engine wait, while the batch is running,
until that many rows are free (or the queue is shorter), so that the admitted requests can be chosen to
share with each other as well. A model-free simulation of bench/serve.py's load (4 seeds) gave 14-23%
fewer distinct bytes per step than FIFO at a p99 TTFT ratio of about 1.3 with the server's defaults (groups
of 2, wait_factor 2, max_skips 6), against 10-17% for one admission per row with max_skips 4; docs/model_server.md.
A caveat of the relative bound: after an idle spell the mean wait is near zero, so the first admissions
of a burst are in arrival order until it grows.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Literal, Protocol, TypeVar

from .settings import ModelServerSettings


class Waiting(Protocol):
    enqueued_at: float
    skipped: int  # times a later arrival was admitted before it

    @property
    def block_bytes(self) -> Mapping[Hashable, int]:
        """Block key -> bytes of the block (the blocks of its memory)."""


W = TypeVar("W", bound=Waiting)


_SERVER = ModelServerSettings.model_construct()
"""The server's defaults (settings.py; not validated, the environment not read): the scheduler's defaults are
the server's, one place for each number."""


class Scheduler:
    """Picks which waiting requests join the batch when slots free up."""

    def __init__(self, mode: Literal["subtree", "fifo"] = _SERVER.scheduler,
                 max_wait_s: float = _SERVER.max_wait_s, max_skips: int = _SERVER.max_skips,
                 wait_factor: float = _SERVER.wait_factor, admit_group: int = _SERVER.admit_group) -> None:
        if mode not in ("subtree", "fifo"):
            raise ValueError(f"unknown scheduler mode {mode!r}")
        self.mode = mode
        self.max_wait_s = max_wait_s
        self.max_skips = max_skips
        self.wait_factor = wait_factor  # 0 = no relative bound
        self.admit_group = admit_group if mode == "subtree" else 1
        self.mean_wait: float | None = None  # exponential average of the waits of admitted requests

    def min_admit(self, n_waiting: int, batch_running: bool, max_rows: int) -> int:
        """Fewest rows worth admitting now: `admit_group` while the batch runs, else 1."""
        if not batch_running:
            return 1
        return max(1, min(self.admit_group, n_waiting, max_rows))

    def pick(self, waiting: Sequence[W], running_keys: set[Hashable], n: int, now: float) -> list[W]:
        """Up to `n` requests of `waiting` to admit now, in admission order; counts the skips."""
        pool = list(waiting)
        chosen: list[W] = []
        nodes = set(running_keys)
        while pool and len(chosen) < n:
            best = self._best(pool, nodes, now)
            pool.remove(best)
            chosen.append(best)
            nodes.update(best.block_bytes)
            wait = now - best.enqueued_at
            self.mean_wait = wait if self.mean_wait is None else 0.9 * self.mean_wait + 0.1 * wait
            for w in pool:
                if w.enqueued_at < best.enqueued_at:
                    w.skipped += 1
        return chosen

    def _best(self, pool: list[W], nodes: set[Hashable], now: float) -> W:
        limit = self.max_wait_s
        if self.wait_factor > 0 and self.mean_wait is not None:
            limit = min(limit, self.wait_factor * self.mean_wait)
        overdue = [w for w in pool if w.skipped >= self.max_skips or now - w.enqueued_at >= limit]
        if self.mode == "fifo" or overdue or not nodes:
            return min(overdue or pool, key=lambda w: w.enqueued_at)

        def score(w: Waiting) -> tuple[int, int, float]:
            shared = sum(b for key, b in w.block_bytes.items() if key in nodes)
            # tie-break: bytes it shares with the other waiting requests, so the next admissions share too
            affinity = sum(b for o in pool if o is not w for key, b in o.block_bytes.items()
                           if key in w.block_bytes)
            return (shared, affinity, -w.enqueued_at)

        return max(pool, key=score)
