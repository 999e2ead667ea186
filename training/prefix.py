"""The prefix cache, and the positions the frozen anchor finds hardest (``--loss surprising``).

With a frozen anchor and memory only in layers >= L0, the residual stream entering layer L0 does not
depend on anything we train, so it is computed once per sequence (``Transformer.hidden_at``) and every step
runs only layers L0.. and the head (``Transformer.forward_from``). Exact, not approximate:
tests/training/test_trainer.py checks loss and gradients against the uncached model.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import cast

import torch

from training.data import atomic_save, loss_targets, pad_hidden, pad_ids
from training.progress import task

log = logging.getLogger(__name__)


@torch.no_grad()
def prefix_hidden(model, token_ids: Sequence[Sequence[int]], layer: int, batch_size: int = 64,
                  progress: bool = False) -> list[torch.Tensor]:
    """Residual stream entering `layer` for each sequence, unpadded: list of (T_i, d) float32 tensors."""
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    out: dict[int, torch.Tensor] = {}
    starts = range(0, len(order), batch_size)
    with task(f"prefix states (layers 0..{layer - 1})", len(starts), "batch", enabled=progress) as bar:
        for s in starts:
            idx = order[s:s + batch_size]
            ids, _ = pad_ids([token_ids[i] for i in idx])
            h = model.hidden_at(ids, layer)  # (B, T, d)
            for b, i in enumerate(idx):
                out[i] = h[b, :len(token_ids[i])].clone()
            bar.update()
    return [out[i] for i in range(len(token_ids))]


class PrefixCache:
    """The states entering `layer` of every training sequence, kept in `file` (one per process)."""

    def __init__(self, model, token_ids: Sequence[Sequence[int]], layer: int, file: Path) -> None:
        self.model, self.token_ids, self.layer, self.file = model, token_ids, layer, file
        self.entries: list[torch.Tensor | None] = []  # None: not computed yet

    def load_or_build(self, lazy: bool = False, progress: bool = False) -> None:
        """Read the file when it holds every sequence; else compute them all now and write it, or with
        `lazy` (data parallel: each process sees other sequences every epoch) as batches ask for them."""
        if self.file.exists():
            self.entries = torch.load(self.file)
            if len(self.entries) == len(self.token_ids):
                return
        if lazy:
            self.entries = [None] * len(self.token_ids)
            return
        t0 = time.perf_counter()
        self.entries = list(prefix_hidden(self.model, self.token_ids, self.layer, progress=progress))
        log.info("prefix cache of %d documents (layers 0..%d) in %.1fs", len(self.entries), self.layer - 1,
                 time.perf_counter() - t0)
        atomic_save(self.entries, self.file)

    def states(self, idx: Sequence[int]) -> list[torch.Tensor]:
        """The states of sequences `idx`, computing the missing ones."""
        missing = [i for i in idx if self.entries[i] is None]
        if missing:
            for i, h in zip(missing, prefix_hidden(self.model, [self.token_ids[i] for i in missing], self.layer),
                            strict=True):
                self.entries[i] = h
        return cast("list[torch.Tensor]", [self.entries[i] for i in idx])  # every entry of idx was filled above


def surprising_positions(model, prefix: PrefixCache, fraction: float,
                         autocast: Callable[[], AbstractContextManager], file: Path) -> list[torch.Tensor]:
    """For ``--loss surprising``: per sequence, (T_i,) bool marking the positions whose next token the frozen
    anchor finds hardest (the top `fraction` by its loss): names and facts rather than the words any model
    predicts. The LM head -- most of a step's work -- then runs only there. Read from `file` when it exists,
    else computed and written there."""
    if file.exists():
        return torch.load(file)
    t0 = time.perf_counter()
    token_ids = prefix.token_ids
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for s in range(0, len(token_ids), 32):
            idx = list(range(s, min(s + 32, len(token_ids))))
            ids, mask = pad_ids([token_ids[i] for i in idx])
            select, targets = loss_targets(ids, mask, [1] * len(idx))
            with autocast():
                logits = model.forward_from(pad_hidden(prefix.states(idx)), prefix.layer, select=select)
            nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
            pos = 0
            for b, i in enumerate(idx):
                n = int(select[b].sum())
                k = max(1, math.ceil(fraction * n))
                keep = torch.zeros(len(token_ids[i]), dtype=torch.bool)
                top = torch.topk(nll[pos:pos + n], k).indices
                keep[torch.nonzero(select[b]).flatten()[top]] = True
                out.append(keep)
                pos += n
    atomic_save(out, file)
    log.info("surprising positions of %d documents in %.1fs", len(out), time.perf_counter() - t0)
    return out
