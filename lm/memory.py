"""Per-row FFN-memories for a batch, prepared once per batch composition and reused every decode step.

Semantics (DESIGN.md §1, CONTRACTS.md "lm"), for every memory layer l and row b:

    y[b] += sum over k in row_blocks[b]:  (silu(h[b] @ G_k[l].T) * (h[b] @ U_k[l].T)) @ Dt_k[l]

with block k = blocks[k] of shape (L_mem, 3, r_k, d): slot 0 = M_gate, 1 = M_up, 2 = M_down transposed.

How it is computed (strategy "grouped", the default). Rows and blocks form a bipartite graph (row b uses
block k); its connected components are the units of work. A component's blocks are concatenated once, at
`build`, into contiguous per-layer tensors GU (2U, d) = [gates; ups] and Dt (U, d), and every step does

    a = h[rows] @ GU.T          # (m*T, 2U): one matmul for all rows of the component
    act = silu(a[:, :U]) * a[:, U:] * mask      # mask (m, U): 1 where the row uses the unit's block
    y[rows] = act @ Dt          # (m*T, d)

So each distinct block is read once per step whatever the number of rows that share it (a level-1 node shared
by 8 rows costs its bytes once), and the only waste is FLOPs on masked units inside a component (rows of one
level-1 subtree multiply each other's deep blocks by 0), which hides under memory bandwidth. Components with
the same (rows, units) shape are stacked and run as one `bmm`, so 16 unrelated paths are one batched matmul.

Autograd: `build` uses only differentiable ops (cat, stack, view, dtype casts) and the step does no in-place
op on its inputs, so blocks that are `nn.Parameter`s receive gradients. Build inside the training step
(after each optimizer update the prepared copies are stale).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lm.errors import MemoryShapeError

STRATEGIES = ("grouped", "single", "per_row")


@dataclass
class _Group:
    """Components with the same shape, stacked: n components of m rows and U units each."""

    rows: torch.Tensor  # (n, m) int64 batch rows of each component
    gu: torch.Tensor  # (L_mem, n, 2U, d) gate rows then up rows of the component's concatenated blocks
    dt: torch.Tensor  # (L_mem, n, U, d) M_down transposed
    mask: torch.Tensor | None  # (n, m, 1, U) 1.0 where the row uses the unit's block; None = all ones

    @property
    def units(self) -> int:
        return self.dt.shape[2]


class MemoryBatch:
    """FFN-memories of the B rows of a batch; `Transformer(..., memory=mb)` adds them in every memory layer.

    Attributes:
        n_rows: B, the batch size it was built for.
        layers: anchor layer index of each block row (len L_mem).
        d_model: d.
        distinct_params: parameters of the distinct blocks (what one step reads).
        row_units: total r of each row (sum of its blocks' r), (B,) list.
    """

    def __init__(self, n_rows: int, layers: Sequence[int], d_model: int, groups: list[_Group],
                 gather: torch.Tensor | None, distinct_params: int, row_units: list[int]):
        self.n_rows = n_rows
        self.layers = list(layers)
        self.d_model = d_model
        self._layer_pos = {layer: j for j, layer in enumerate(self.layers)}
        self._groups = groups
        self._gather = gather  # (B,) index into the concatenated group outputs (+1 zero row); None = identity
        self.distinct_params = distinct_params
        self.row_units = row_units

    @property
    def distinct_nbytes(self) -> int:
        """Bytes of the distinct blocks in the compute dtype: what one decode step reads."""
        if not self._groups:
            return 0
        return self.distinct_params * self._groups[0].gu.element_size()

    @property
    def prepared_nbytes(self) -> int:
        return sum(g.gu.nbytes + g.dt.nbytes for g in self._groups)

    @classmethod
    def build(cls, blocks: Sequence[torch.Tensor], row_blocks: Sequence[Sequence[int]], layers: Sequence[int],
              *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
              strategy: str = "grouped") -> MemoryBatch:
        """Prepare the memories of a batch.

        Args:
            blocks: the distinct blocks of the batch, each (L_mem, 3, r_k, d); r_k may differ.
            row_blocks: for each row b, the indices into `blocks` that row uses (empty = no memory).
            layers: the anchor layer of each of the L_mem block rows (the bank's `memory_layers`).
            dtype, device: compute dtype/device (default: those of the first block).
            strategy: "grouped" (default, see module doc); "single" = one masked matmul over all distinct
                blocks; "per_row" = every row its own copy of its blocks (no sharing, for comparison).
        """
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        layers = [int(x) for x in layers]
        if len(set(layers)) != len(layers):
            raise MemoryShapeError(f"memory layers repeat: {layers}")
        n_rows = len(row_blocks)
        d = None
        for k, blk in enumerate(blocks):
            if blk.dim() != 4 or blk.shape[0] != len(layers) or blk.shape[1] != 3:
                raise MemoryShapeError(f"block {k} has shape {tuple(blk.shape)}, expected ({len(layers)}, 3, r, d)")
            if d is None:
                d = blk.shape[3]
            elif blk.shape[3] != d:
                raise MemoryShapeError(f"block {k} has d={blk.shape[3]}, block 0 has d={d}")
        for b, ks in enumerate(row_blocks):
            if len(set(ks)) != len(ks):
                raise ValueError(f"row {b} lists a block twice: {list(ks)}")
            for k in ks:
                if not 0 <= k < len(blocks):
                    raise ValueError(f"row {b} uses block {k}, only {len(blocks)} blocks given")
        row_units = [sum(int(blocks[k].shape[2]) for k in ks) for ks in row_blocks]
        used = sorted({k for ks in row_blocks for k in ks})
        distinct_params = sum(blocks[k].numel() for k in used)
        if not used:
            return cls(n_rows, layers, d or 0, [], None, 0, row_units)
        dtype = dtype or blocks[used[0]].dtype
        device = device if device is not None else blocks[used[0]].device

        components = _components(row_blocks, len(blocks), strategy)  # list of (rows, blocks)
        by_shape: dict[tuple[int, int], list[tuple[list[int], list[int]]]] = defaultdict(list)
        for rows, ks in components:
            by_shape[(len(rows), sum(int(blocks[k].shape[2]) for k in ks))].append((rows, ks))

        groups, order = [], []
        for (m, units), comps in by_shape.items():
            gates = []
            downs = []
            for _, ks in comps:
                gates += [blocks[k][:, 0] for k in ks] + [blocks[k][:, 1] for k in ks]
                downs += [blocks[k][:, 2] for k in ks]
            L = len(layers)
            gu = torch.cat(gates, dim=1).to(device=device, dtype=dtype).view(L, len(comps), 2 * units, d)
            dt = torch.cat(downs, dim=1).to(device=device, dtype=dtype).view(L, len(comps), units, d)
            mask = torch.ones(len(comps), m, 1, units, dtype=dtype)
            for c, (rows, ks) in enumerate(comps):
                start = 0
                for k in ks:
                    r = int(blocks[k].shape[2])
                    for i, b in enumerate(rows):
                        if k not in row_blocks[b]:
                            mask[c, i, 0, start:start + r] = 0
                    start += r
            rows_t = torch.tensor([rows for rows, _ in comps], dtype=torch.long, device=device)  # (n, m)
            groups.append(_Group(rows_t, gu, dt, None if bool(mask.all()) else mask.to(device)))
            order += [b for rows, _ in comps for b in rows]

        # Row b's output sits at position pos[b] of the concatenated group outputs; rows without memory
        # point at one extra zero row appended at the end.
        pos = torch.full((n_rows,), len(order), dtype=torch.long)
        pos[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        identity = len(order) == n_rows and bool((pos == torch.arange(n_rows)).all())
        gather = None if identity else pos.to(device)
        return cls(n_rows, layers, d, groups, gather, distinct_params, row_units)

    def ffn_delta(self, layer: int, h: torch.Tensor) -> torch.Tensor | None:
        """What the memories add to the FFN output of anchor layer `layer` for input h (B, T, d);
        None when `layer` carries no memory or no row has one."""
        j = self._layer_pos.get(layer)
        if j is None or not self._groups:
            return None
        B, T, d = h.shape
        if B != self.n_rows or d != self.d_model:
            raise MemoryShapeError(f"memory built for {self.n_rows} rows of d={self.d_model}, got {tuple(h.shape)}")
        outs = []
        for g in self._groups:
            n, m = g.rows.shape
            U = g.units
            if n == 1 and self._gather is None and len(self._groups) == 1:
                x = h.reshape(1, B * T, d)  # the one component covers every row in order: no gather
            else:
                x = h[g.rows.reshape(-1)].reshape(n, m * T, d)  # (n, m*T, d)
            a = torch.bmm(x, g.gu[j].transpose(1, 2))  # (n, m*T, 2U)
            act = F.silu(a[..., :U]) * a[..., U:]  # (n, m*T, U)
            if g.mask is not None:
                act = (act.view(n, m, T, U) * g.mask).view(n, m * T, U)
            outs.append(torch.bmm(act, g.dt[j]).view(n * m, T, d))  # (n*m, T, d)
        if self._gather is None:
            return outs[0] if len(outs) == 1 else torch.cat(outs)
        outs.append(h.new_zeros(1, T, d))
        return torch.cat(outs)[self._gather]  # (B, T, d)


def _components(row_blocks: Sequence[Sequence[int]], n_blocks: int, strategy: str):
    """Connected components of the row-block graph as (rows, blocks) lists, rows without memory left out."""
    rows_with = [b for b, ks in enumerate(row_blocks) if ks]
    if strategy == "per_row":
        return [([b], list(row_blocks[b])) for b in rows_with]
    if strategy == "single":
        return [(rows_with, sorted({k for b in rows_with for k in row_blocks[b]}))]
    parent = list(range(n_blocks))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for b in rows_with:
        ks = row_blocks[b]
        for k in ks[1:]:
            parent[find(k)] = find(ks[0])
    comps: dict[int, tuple[list[int], list[int]]] = {}
    for b in rows_with:
        comps.setdefault(find(row_blocks[b][0]), ([], []))[0].append(b)
    for k in sorted({k for b in rows_with for k in row_blocks[b]}):
        comps[find(k)][1].append(k)
    return list(comps.values())
