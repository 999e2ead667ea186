"""Continuous-batching engine: one background thread owns the model and its KV-cache slots.

Requests join the running batch between decode steps (prefilled a chunk at a time, so running rows
never wait for a whole prompt) and leave it when they finish or their client goes away. Each row carries
its own memory blocks, named by key; the runner keeps every *distinct* block of the admitted rows once, in
slots (services/model_server/slot_memory.py), and each forward points its rows at them by index.

Semantics of one engine iteration:

    take new requests and cancellations from the inbox
    admit waiting requests into free slots, in the scheduler's order
    when rows were admitted or left: runner.set_blocks(distinct blocks of every admitted row)
    prefill the next chunk of the oldest admitted-but-not-prefilled requests, as many as fit in one
        forward of `prefill_chunk` (padded) tokens (each its first token when done)
    decode a token for every running row: logits = runner.decode(slots, last_tokens, each row's block keys)
    emit tokens; finished and cancelled rows are answered at once and leave the batch at once

A row that joins costs a copy of the blocks no admitted row had (once); a row that leaves costs nothing but
the slot moves that keep the pools compact. One KV-cache slot per row: `max_rows` = the runner's slots.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .errors import Overloaded
from .metrics import Metrics
from .request_memory import RequestMemory
from .sampling import Sampling, sample
from .scheduler import Scheduler

log = logging.getLogger(__name__)


class Runner(Protocol):
    """The model as the engine drives it (see runner.py for the `lm` implementation)."""

    n_slots: int
    max_seq_len: int
    eos_token_ids: set[int]

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype blocks are handed over in (the runner's compute dtype)."""
        ...

    def set_blocks(self, blocks: Mapping[Hashable, torch.Tensor]) -> None:
        """Hold exactly these blocks (every admitted row's), by key, for the forwards that follow."""
        ...

    def prefill(self, slots: Sequence[int], chunks: Sequence[Sequence[int]], starts: Sequence[int],
                rows: Sequence[Sequence[Hashable]]) -> torch.Tensor:
        """Logits (B, V): row b's after appending `chunks[b]` at `starts[b]` of KV slot `slots[b]`, with the
        blocks named `rows[b]` (one forward for all the rows)."""
        ...

    def decode(self, slots: Sequence[int], tokens: Sequence[int], rows: Sequence[Sequence[Hashable]]
               ) -> torch.Tensor:
        """Logits (B, V) of one token per row; `rows[b]` names row b's blocks."""
        ...

    def release(self, slot: int) -> None: ...

    def decode_text(self, ids: Sequence[int]) -> str: ...


@dataclass
class Event:
    """What the engine tells a request's consumer: a token, the end, or an error."""

    kind: str  # "token" | "done" | "error"
    token_id: int | None = None
    text: str = ""
    finish_reason: str | None = None
    error: BaseException | None = None


@dataclass
class GenRequest:
    """One sequence to generate, with the blocks of its memory (request_memory.py)."""

    prompt_ids: list[int]
    params: Sampling
    sink: Callable[[Event], None]
    memory: RequestMemory = field(default_factory=RequestMemory)
    request_id: str = ""
    # --- engine state ---
    enqueued_at: float = 0.0
    slot: int = -1
    prefilled: int = 0
    generated: list[int] = field(default_factory=list)
    text: str = ""
    emitted_chars: int = 0
    cancelled: bool = False
    finished: bool = False
    first_token_at: float | None = None
    fed: int = 0  # tokens fed by decode steps (KV length = prefilled + fed)
    skipped: int = 0  # times the scheduler admitted a later arrival first
    _gen: torch.Generator | None = None

    @property
    def block_bytes(self) -> Mapping[Hashable, int]:
        return self.memory.block_bytes


@dataclass
class EngineStats:
    """Counters read by tests, /metrics and the benchmark."""

    decode_steps: int = 0
    decode_rows: int = 0
    decode_seconds: float = 0.0
    prefill_chunks: int = 0
    distinct_memory_bytes: int = 0  # summed over decode steps
    memory_rebuilds: int = 0  # set_blocks calls (the admitted rows changed)
    rebuild_seconds: float = 0.0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0


class Engine:
    """Owns the runner in one thread; `submit` and `cancel` are safe from any thread."""

    def __init__(self, runner: Runner, *, scheduler: Scheduler, max_queue: int, prefill_chunk: int = 256,
                 metrics: Metrics | None = None, retry_after_s: int = 1, max_rows: int | None = None) -> None:
        self.runner = runner
        self.max_rows = min(max_rows or runner.n_slots, runner.n_slots)
        self.scheduler = scheduler
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.metrics = metrics
        self.retry_after_s = retry_after_s
        self.stats = EngineStats()
        self._cv = threading.Condition()
        self._inbox: deque[GenRequest] = deque()
        self._waiting: list[GenRequest] = []
        self._prefilling: list[GenRequest] = []
        self._active: list[GenRequest] = []
        self._free_slots = list(range(runner.n_slots))
        self._n_waiting = 0  # inbox + waiting, read under _cv
        self._stop = False
        self._memory_bytes = 0  # distinct block bytes of the decoding rows
        self._dirty = True  # admitted rows changed since the last set_blocks
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="hiermem-engine", daemon=True)

    # ---- public ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, req: GenRequest) -> GenRequest:
        """Queue `req`; raises Overloaded when `max_queue` requests already wait."""
        with self._cv:
            if self._stop:
                raise Overloaded("server is shutting down", self.retry_after_s)
            if self._n_waiting >= self.max_queue:
                raise Overloaded(f"queue full ({self.max_queue} waiting); retry later", self.retry_after_s)
            req.enqueued_at = time.monotonic()
            req.request_id = req.request_id or f"r{next(self._ids)}"
            self._n_waiting += 1
            self._inbox.append(req)
            self._set_gauges()
            self._cv.notify_all()
        return req

    def cancel(self, req: GenRequest) -> None:
        """Stop `req` (client went away); its slot is freed before the next decode step."""
        with self._cv:
            req.cancelled = True
            self._cv.notify_all()

    def snapshot(self) -> dict[str, int]:
        """Rows running, prefilling and waiting right now."""
        with self._cv:
            return {"active": len(self._active), "prefilling": len(self._prefilling),
                    "waiting": self._n_waiting, "free_slots": len(self._free_slots)}

    # ---- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not (self._inbox or self._waiting or self._prefilling or self._active):
                    self._cv.wait(timeout=0.5)
                if self._stop:
                    break
                self._waiting.extend(self._inbox)
                self._inbox.clear()
            try:
                self._step()
            except Exception as exc:  # a failing step fails its rows, never the engine
                log.exception("engine step failed")
                for req in self._prefilling + self._active:
                    self._finish(req, error=exc)
                self._prefilling, self._active, self._dirty = [], [], True
        for req in self._waiting + list(self._inbox) + self._prefilling + self._active:
            self._finish(req, error=RuntimeError("server shutting down"))

    def _step(self) -> None:
        self._drop_cancelled()
        self._admit()
        if self._dirty:
            self._sync_blocks()
        if self._prefilling:
            self._prefill_chunks()
        if self._active:
            self._decode()
        if self._dirty and not (self._active or self._prefilling):
            self._sync_blocks()  # the last rows left: hold no block while idle
        self._set_gauges()

    def _drop_cancelled(self) -> None:
        for group in (self._waiting, self._prefilling, self._active):
            for req in [r for r in group if r.cancelled]:
                group.remove(req)
                if group is self._waiting:
                    self._dec_waiting()
                self.stats.cancelled += 1
                if self.metrics is not None:
                    self.metrics.cancelled.inc()
                self._finish(req, reason="cancelled")

    def _admit(self) -> None:
        rows_free = self.max_rows - len(self._active) - len(self._prefilling)
        if rows_free <= 0 or not self._waiting:
            return
        n = min(rows_free, len(self._free_slots))
        if n <= 0:
            return
        if n < self.scheduler.min_admit(len(self._waiting), bool(self._active or self._prefilling), self.max_rows):
            return  # let a group of slots free up, so the scheduler has a choice among the waiting
        running = set().union(*(r.memory.keys for r in self._active + self._prefilling))
        picks = self.scheduler.pick(self._waiting, running, n, time.monotonic())
        for req in picks:
            self._waiting.remove(req)
            self._dec_waiting()
            req.slot = self._free_slots.pop(0)
            req._gen = req.params.generator()
            self._prefilling.append(req)
            self._dirty = True

    def _prefill_chunks(self) -> None:
        """The next chunk of the oldest prefilling requests in one forward: rows join while the padded width
        times the rows stays within `prefill_chunk` tokens (requests that arrive together, as a burst of
        clients' next questions does, are prefilled together) and the padding fits the KV slots."""
        group: list[tuple[GenRequest, list[int]]] = []
        width = start = 0  # the padded width and the furthest start of the rows taken so far
        for req in self._prefilling:
            chunk = req.prompt_ids[req.prefilled:req.prefilled + self.prefill_chunk]
            w, s = max(width, len(chunk)), max(start, req.prefilled)
            if group and (w * (len(group) + 1) > self.prefill_chunk or s + w > self.runner.max_seq_len):
                break
            group.append((req, chunk))
            width, start = w, s
        logits = self.runner.prefill([r.slot for r, _ in group], [c for _, c in group],
                                     [r.prefilled for r, _ in group], [r.memory.keys for r, _ in group])
        for i, (req, chunk) in enumerate(group):
            req.prefilled += len(chunk)
            self.stats.prefill_chunks += 1
            if req.prefilled < len(req.prompt_ids):
                continue
            self._prefilling.remove(req)
            self._active.append(req)
            self._memory_bytes = self._distinct_bytes(self._active)
            self._accept(req, sample(logits[i], req.params, req._gen))

    def _decode(self) -> None:
        rows = list(self._active)
        t0 = time.perf_counter()
        logits = self.runner.decode([r.slot for r in rows], [r.generated[-1] for r in rows],
                                    [r.memory.keys for r in rows])
        for r in rows:
            r.fed += 1
        dt = time.perf_counter() - t0
        self.stats.decode_seconds += dt
        self.stats.decode_steps += 1
        self.stats.decode_rows += len(rows)
        self.stats.distinct_memory_bytes += self._memory_bytes
        if self.metrics is not None:
            self.metrics.decode_steps.inc()
            self.metrics.decode_rows.inc(len(rows))
            self.metrics.decode_seconds.inc(dt)
            self.metrics.decode_memory_bytes.inc(self._memory_bytes)
        for i, req in enumerate(rows):
            self._accept(req, sample(logits[i], req.params, req._gen))

    @staticmethod
    def _distinct_bytes(reqs: Sequence[GenRequest]) -> int:
        held = {k: n for r in reqs for k, n in r.memory.block_bytes.items()}
        return sum(held.values())

    def _sync_blocks(self) -> None:
        """Hand the runner the distinct blocks of every admitted row (decoding or prefilling)."""
        rows = self._active + self._prefilling
        held = {k: b for r in rows for k, b in r.memory.blocks.items()}
        t0 = time.perf_counter()
        self.runner.set_blocks(held)
        dt = time.perf_counter() - t0
        self._memory_bytes = self._distinct_bytes(self._active)
        self.stats.memory_rebuilds += 1
        self.stats.rebuild_seconds += dt
        if self.metrics is not None:
            self.metrics.rebuild_seconds.inc(dt)
            self.metrics.distinct_memory_bytes.set(self._memory_bytes)
        self._dirty = False

    # ---- per-token bookkeeping ---------------------------------------------------------------
    def _accept(self, req: GenRequest, token: int) -> None:
        """Record `token` for `req`, emit the text that is safe to emit, finish when due."""
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
            if self.metrics is not None:
                self.metrics.ttft.observe(req.first_token_at - req.enqueued_at)
        is_eos = token in self.runner.eos_token_ids and not req.params.ignore_eos
        if not is_eos:
            req.generated.append(token)
            req.text = self.runner.decode_text(req.generated)
        else:
            req.generated.append(token)
        reason = None
        cut = None
        for s in req.params.stop:
            pos = req.text.find(s, max(0, req.emitted_chars - len(s)))
            if pos >= 0 and (cut is None or pos < cut):
                cut = pos
        if cut is not None:
            req.text, reason = req.text[:cut], "stop_sequence"
        elif is_eos:
            reason = "eos_token"
        elif len(req.generated) >= req.params.max_new_tokens:
            reason = "length"
        elif req.slot >= 0 and req.prefilled + len(req.generated) >= self.runner.max_seq_len:
            reason = "length"
        hold = 0 if reason else max((len(s) - 1 for s in req.params.stop), default=0)
        safe = len(req.text) - hold
        if not reason and req.text.endswith("\ufffd"):
            safe = min(safe, len(req.text) - 1)  # an incomplete UTF-8 sequence: wait for the rest
        if safe > req.emitted_chars:
            req.sink(Event("token", token_id=token, text=req.text[req.emitted_chars:safe]))
            req.emitted_chars = safe
        elif not is_eos:
            req.sink(Event("token", token_id=token, text=""))
        if self.metrics is not None:
            self.metrics.tokens.labels(kind="completion").inc()
        if reason:
            if req in self._active:
                self._active.remove(req)
            self.stats.completed += 1
            self._finish(req, reason=reason)

    def _release(self, req: GenRequest) -> None:
        try:
            self.runner.release(req.slot)
        finally:
            self._free_slots.append(req.slot)
            req.slot = -1

    def _finish(self, req: GenRequest, *, reason: str | None = None, error: BaseException | None = None) -> None:
        """Answer `req` and free its KV slot; its blocks leave the runner's slots at the next sync."""
        if req.finished:
            return
        req.finished = True
        if req.slot >= 0:
            self._release(req)
            self._dirty = True
        if error is not None:
            self.stats.failed += 1
            req.sink(Event("error", error=error))
        else:
            req.sink(Event("done", finish_reason=reason))

    def _dec_waiting(self) -> None:
        with self._cv:
            self._n_waiting -= 1

    def _set_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._n_waiting)
            self.metrics.batch_rows.set(len(self._active) + len(self._prefilling))
