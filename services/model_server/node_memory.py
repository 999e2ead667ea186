"""Per-node FFN-memory for a decode batch, built without copying a single block.

`lm.MemoryBatch` concatenates the batch's blocks into per-component tensors at build time, which costs a
copy of every distinct block each time the batch composition changes (a row joins or leaves: every few
steps under continuous batching). `NodeMemory` keeps the blocks where the block cache holds them and does
one matmul per distinct node over the rows that use it (DESIGN §6.3), so a rebuild costs only index lists.

Semantics, for memory layer j (anchor layer `layers[j]`) and input h (B, T, d):

    out = 0
    for each set R of rows that use exactly the same blocks K_R:      # e.g. a shared level-1 node
        x = h[R]                                                      # (m, T, d), once per row set
        for k in K_R:
            a = x @ GU_k[j].T                # (m, T, 2r_k), GU_k[j] = block_k[j, 0:2] viewed (2 r_k, d)
            y += (silu(a[..., :r_k]) * a[..., r_k:]) @ Dt_k[j]        # (m, T, d)
        out[R] += y

Every distinct block is read once per step, whatever the number of rows that share it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


class NodeMemory:
    """Duck-types `lm.MemoryBatch` for `Transformer.forward`: `n_rows`, `ffn_delta(layer, h)`."""

    def __init__(self, blocks: Sequence[torch.Tensor], row_blocks: Sequence[Sequence[int]], layers: Sequence[int],
                 dtype: torch.dtype = torch.float32) -> None:
        self.n_rows = len(row_blocks)
        self.layers = [int(x) for x in layers]
        self._layer_pos = {layer: j for j, layer in enumerate(self.layers)}
        self._blocks = [b if b.dtype == dtype else b.to(dtype) for b in blocks]  # (L_mem, 3, r, d) each
        rows_of: dict[int, list[int]] = {}
        for b, ks in enumerate(row_blocks):
            for k in ks:
                rows_of.setdefault(k, []).append(b)
        # group blocks by the exact row set that uses them
        sets: dict[tuple[int, ...], list[int]] = {}
        for k, rows in rows_of.items():
            sets.setdefault(tuple(rows), []).append(k)
        self._groups: list[tuple[torch.Tensor | None, list[int]]] = []
        for row_set, ks in sets.items():
            idx = None if list(row_set) == list(range(self.n_rows)) else torch.tensor(row_set, dtype=torch.long)
            self._groups.append((idx, ks))
        self.distinct_nbytes = sum(self._blocks[k].numel() * self._blocks[k].element_size() for k in rows_of)

    def ffn_delta(self, layer: int, h: torch.Tensor) -> torch.Tensor | None:
        j = self._layer_pos.get(layer)
        if j is None or not self._groups:
            return None
        out = torch.zeros_like(h)  # (B, T, d)
        for idx, ks in self._groups:
            x = h if idx is None else h.index_select(0, idx)  # (m, T, d)
            y = None
            for k in ks:
                blk = self._blocks[k]
                r = blk.shape[2]
                gu = blk[j, :2].reshape(2 * r, blk.shape[3])  # (2r, d) view: gate rows then up rows
                a = x @ gu.T  # (m, T, 2r)
                part = (F.silu(a[..., :r]) * a[..., r:]) @ blk[j, 2]  # (m, T, d)
                y = part if y is None else y.add_(part)
            assert y is not None  # every row-set group holds at least one block
            if idx is None:
                out.add_(y)
            else:
                out.index_add_(0, idx, y)
        return out
