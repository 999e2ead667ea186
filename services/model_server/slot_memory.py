"""Batch memory in slots that persist across batch compositions (the LoRA-slot idea of vLLM / LoRAX).

Blocks of equal rank r share a pool: per-layer buffers GU (L, S, 2r, d) and Dt (L, S, r, d) whose first
`n` slots hold the blocks of the current batch. A block is copied into a slot once, when it enters the
batch, and stays there while rows use it; a rebuild after a join or leave copies only the blocks that
entered (plus the few moved to keep the slots compact), where `lm.MemoryBatch.build` copies every distinct
block. Each decode step is then two `bmm`s per pool and layer, reading each distinct block once.

Semantics, for memory layer j and input h (B, T, d); pool P with blocks in slots 0..n-1:

    for each slot s: R_s = rows that use the block in slot s      (padded to m = max |R_s| with a zero row)
    x = h[R]                                  # (n, m*T, d)
    a = bmm(x, GU[j, :n].T)                   # (n, m*T, 2r)
    y = bmm(silu(a[..., :r]) * a[..., r:], Dt[j, :n])              # (n, m*T, d)
    out[R_s] += y[s]                          # padding dropped
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


class _Pool:
    """Slots for the blocks of one rank r; slots 0..n-1 are in use."""

    def __init__(self, n_layers: int, r: int, d: int, dtype: torch.dtype, capacity: int = 4) -> None:
        self.r, self.d, self.dtype = r, d, dtype
        self.gu = torch.empty(n_layers, capacity, 2 * r, d, dtype=dtype)  # (L, S, 2r, d)
        self.dt = torch.empty(n_layers, capacity, r, d, dtype=dtype)  # (L, S, r, d)
        self.held: list[torch.Tensor] = []  # block in slot s (kept alive: its id() names the slot)
        self.copies = 0  # blocks copied in, for tests and stats

    def slot_of(self) -> dict[int, int]:
        return {id(b): s for s, b in enumerate(self.held)}

    def sync(self, wanted: list[torch.Tensor]) -> None:
        """Make slots 0..len(wanted)-1 hold exactly `wanted` (in any order), copying as little as possible."""
        keep = {id(b) for b in wanted}
        s = 0
        while s < len(self.held):  # drop unused blocks, moving the last slot into the hole
            if id(self.held[s]) in keep:
                s += 1
                continue
            last = len(self.held) - 1
            if s != last:
                self.gu[:, s] = self.gu[:, last]
                self.dt[:, s] = self.dt[:, last]
                self.held[s] = self.held[last]
            self.held.pop()
        have = {id(b) for b in self.held}
        new = [b for b in wanted if id(b) not in have]
        need = len(self.held) + len(new)
        if need > self.gu.shape[1]:
            self._grow(max(need, 2 * self.gu.shape[1]))
        for b in new:
            s = len(self.held)
            self.gu[:, s] = b[:, :2].reshape(b.shape[0], 2 * self.r, self.d)
            self.dt[:, s] = b[:, 2]
            self.held.append(b)
            self.copies += 1

    def _grow(self, capacity: int) -> None:
        n = len(self.held)
        gu = torch.empty(self.gu.shape[0], capacity, 2 * self.r, self.d, dtype=self.dtype)
        dt = torch.empty(self.dt.shape[0], capacity, self.r, self.d, dtype=self.dtype)
        gu[:, :n], dt[:, :n] = self.gu[:, :n], self.dt[:, :n]
        self.gu, self.dt = gu, dt


class SlotPools:
    """The pools of one engine; `build` returns the batch memory for `Transformer.forward`."""

    def __init__(self, layers: Sequence[int], dtype: torch.dtype = torch.float32) -> None:
        self.layers = [int(x) for x in layers]
        self.dtype = dtype
        self.pools: dict[int, _Pool] = {}

    def build(self, blocks: Sequence[torch.Tensor], row_blocks: Sequence[Sequence[int]]) -> SlotMemory:
        blocks = [b if b.dtype == self.dtype else b.to(self.dtype) for b in blocks]
        used = sorted({k for ks in row_blocks for k in ks})
        by_rank: dict[int, list[torch.Tensor]] = {}
        for k in used:
            by_rank.setdefault(int(blocks[k].shape[2]), []).append(blocks[k])
        for r, idle in list(self.pools.items()):
            if r not in by_rank:
                idle.sync([])  # release references; buffers stay for the next batch
        plans = []
        for r, wanted in by_rank.items():
            b0 = wanted[0]
            pool = self.pools.get(r)
            if pool is None:
                pool = self.pools[r] = _Pool(b0.shape[0], r, b0.shape[3], self.dtype)
            pool.sync(wanted)
            slot = pool.slot_of()
            rows_of: list[list[int]] = [[] for _ in range(len(pool.held))]
            for b, ks in enumerate(row_blocks):
                for k in ks:
                    if int(blocks[k].shape[2]) == r:
                        rows_of[slot[id(blocks[k])]].append(b)
            plans.append((pool, len(pool.held), rows_of))
        return SlotMemory(len(row_blocks), self.layers, plans)


class SlotMemory:
    """Duck-types `lm.MemoryBatch` for `Transformer.forward`: `n_rows`, `ffn_delta(layer, h)`."""

    def __init__(self, n_rows: int, layers: list[int], plans: list[tuple[_Pool, int, list[list[int]]]]) -> None:
        self.n_rows = n_rows
        self._layer_pos = {layer: j for j, layer in enumerate(layers)}
        self._plans = []
        self.distinct_nbytes = 0
        for pool, n, rows_of in plans:
            m = max(len(rows) for rows in rows_of)
            # gather (n, m): row index per (slot, position), padding -> the zero row n_rows
            gather = torch.full((n, m), n_rows, dtype=torch.long)
            for s, rows in enumerate(rows_of):
                gather[s, :len(rows)] = torch.tensor(rows, dtype=torch.long)
            flat = gather.reshape(-1)
            valid = (flat < n_rows).nonzero().reshape(-1)  # positions of real rows in the flat layout
            self._plans.append((pool, n, m, flat, valid, flat[valid]))
            self.distinct_nbytes += n * (pool.gu[0, 0].numel() + pool.dt[0, 0].numel()) * pool.gu.element_size() \
                * pool.gu.shape[0]

    def ffn_delta(self, layer: int, h: torch.Tensor) -> torch.Tensor | None:
        j = self._layer_pos.get(layer)
        if j is None or not self._plans:
            return None
        B, T, d = h.shape
        hz = torch.cat([h, h.new_zeros(1, T, d)])  # (B+1, T, d): row B is the padding row
        out = torch.zeros_like(h)
        for pool, n, m, flat, valid, targets in self._plans:
            x = hz.index_select(0, flat).reshape(n, m * T, d)  # (n, m*T, d)
            a = torch.bmm(x, pool.gu[j, :n].transpose(1, 2))  # (n, m*T, 2r)
            r = pool.r
            y = torch.bmm(F.silu(a[..., :r]) * a[..., r:], pool.dt[j, :n])  # (n, m*T, d)
            y = y.reshape(n * m, T, d)
            if valid.numel() != n * m:
                y = y.index_select(0, valid)
            out.index_add_(0, targets, y)
        return out
