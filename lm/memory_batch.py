"""Per-row FFN-memories of a batch for training and evaluation (`MemoryBatch`), prepared once per batch.

Serving keeps blocks in slots across batch compositions instead (services/model_server/slot_memory.py);
both compute the same function, tested against each other.

Semantics (docs/design.md §1 and §9), for every memory layer l and row b:

    y[b] += sum over k in row_blocks[b]:  (silu(h[b] @ G_k[l].T) * (h[b] @ U_k[l].T)) @ Dt_k[l]

with block k = blocks[k] of shape (L_mem, 3, r_k, d): slot 0 = M_gate, 1 = M_up, 2 = M_down transposed.

How it is computed. Blocks used by exactly the same set of rows form a
class (for tree paths: a level-1 node shared by rows {0, 3}, or the deeper blocks private to row 5). A
class's blocks are concatenated once, at `build`, into contiguous per-layer tensors GU (2U, d) = [gates; ups]
and Dt (U, d), and every step does, for the class's m rows:

    a = h[rows] @ GU.T          # (m*T, 2U): one matmul for all rows that use these blocks, no others
    act = silu(a[:, :U]) * a[:, U:]
    y[rows] += act @ Dt         # (m*T, d)

So each distinct block is read once per step however many rows share it, and no FLOP is spent on a row that
does not use a block. Classes of the same (rows, units) shape are stacked at build and run as one `bmm`, so
a tree-shaped batch of 16 paths takes a handful of matmuls per layer (e.g. level-1 nodes shared by 2 rows;
deep blocks private to one row).

A row-set class never wastes a FLOP but a tree batch has up to three per level-1 subtree, and every group
costs a few ops per layer; so `build` decides per connected component of the row-block graph: a component
whose rows are few (masked FLOPs at most 2x the useful ones, e.g. two rows under one level-1 node) stays one
masked class (act *= mask, 1 where the row uses the unit's block); a large one (16 rows under one level-1
node) is split into row-set classes.

Autograd: `build` uses only differentiable ops (cat, stack, view, dtype casts) and the step does no in-place
op on its inputs, so blocks that are `nn.Parameter`s receive gradients. Build inside the training step
(after each optimizer update the prepared copies are stale).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lm.errors import MemoryShapeError


def distinct_blocks(rows: Sequence[Sequence[Hashable]], get_block: Callable[[Hashable], torch.Tensor | None]
                    ) -> tuple[list[torch.Tensor], list[list[int]]]:
    """(the distinct blocks, each row's indices into them) for rows given by their blocks' keys: what
    `MemoryBatch.build` (and the model server's slot memories) take. Each key's block is fetched once;
    None from `get_block` means absent and the key is skipped."""
    blocks: list[torch.Tensor] = []
    index: dict[Hashable, int | None] = {}
    row_blocks: list[list[int]] = []
    for keys in rows:
        ks = []
        for key in keys:
            if key not in index:
                block = get_block(key)
                index[key] = None if block is None else len(blocks)
                if block is not None:
                    blocks.append(block)
            k = index[key]
            if k is not None:
                ks.append(k)
        row_blocks.append(ks)
    return blocks, row_blocks


@dataclass
class _Group:
    """Classes with the same shape, stacked: n classes of m rows and U units each."""

    rows: torch.Tensor  # (n, m) int64 batch rows of each class
    gu: torch.Tensor  # (L_mem, n, 2U, d) gate rows then up rows of the class's concatenated blocks
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
                 direct: bool, distinct_params: int, row_units: list[int]):
        self.n_rows = n_rows
        self.layers = list(layers)
        self.d_model = d_model
        self._layer_pos = {layer: j for j, layer in enumerate(self.layers)}
        self._groups = groups
        self._direct = direct  # one group whose rows are 0..B-1 once each, in order: its output is y
        # (N,) the rows of every group, concatenated (empty without groups: ffn_delta then returns None)
        self._all_rows = (torch.cat([g.rows.reshape(-1) for g in groups]) if groups
                          else torch.empty(0, dtype=torch.long))
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
    def from_paths(cls, paths: Sequence[Sequence[Hashable]], get_block: Callable[[Hashable], torch.Tensor | None],
                   layers: Sequence[int], **options) -> MemoryBatch | None:
        """The memory of rows given by the keys of their blocks (e.g. a path's `NodeRef`s): each distinct key's
        block is fetched once with `get_block` (None = absent, skipped) and shared by the rows naming it.
        Returns None when no row has a block. `options` go to `build`."""
        blocks, row_blocks = distinct_blocks(paths, get_block)
        return cls.build(blocks, row_blocks, layers, **options) if blocks else None

    @classmethod
    def build(cls, blocks: Sequence[torch.Tensor], row_blocks: Sequence[Sequence[int]], layers: Sequence[int],
              *, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> MemoryBatch:
        """Prepare the memories of a batch.

        Args:
            blocks: the distinct blocks of the batch, each (L_mem, 3, r_k, d); r_k may differ.
            row_blocks: for each row b, the indices into `blocks` that row uses (empty = no memory).
            layers: the anchor layer of each of the L_mem block rows (the bank's `memory_layers`).
            dtype, device: compute dtype/device (default: those of the first block).
        """
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
            return cls(n_rows, layers, d or 0, [], False, 0, row_units)
        d = int(blocks[used[0]].shape[3])  # every block has this d (checked above)
        dtype = dtype or blocks[used[0]].dtype
        device = device if device is not None else blocks[used[0]].device

        widths = [int(blk.shape[2]) for blk in blocks]
        classes = _classes(row_blocks, widths)  # list of (rows, blocks)
        by_shape: dict[tuple[int, int], list[tuple[list[int], list[int]]]] = defaultdict(list)
        for rows, ks in classes:
            by_shape[(len(rows), sum(int(blocks[k].shape[2]) for k in ks))].append((rows, ks))

        groups = []
        L = len(layers)
        for (m, units), members in by_shape.items():
            gates, downs = [], []
            for _, ks in members:
                gates += [blocks[k][:, 0] for k in ks] + [blocks[k][:, 1] for k in ks]
                downs += [blocks[k][:, 2] for k in ks]
            gu = torch.cat(gates, dim=1).to(device=device, dtype=dtype).view(L, len(members), 2 * units, d)
            dt = torch.cat(downs, dim=1).to(device=device, dtype=dtype).view(L, len(members), units, d)
            mask = torch.ones(len(members), m, 1, units, dtype=dtype)
            for c, (rows, ks) in enumerate(members):
                start = 0
                for k in ks:
                    r = int(blocks[k].shape[2])
                    for i, b in enumerate(rows):
                        if k not in row_blocks[b]:
                            mask[c, i, 0, start:start + r] = 0
                    start += r
            rows_t = torch.tensor([rows for rows, _ in members], dtype=torch.long, device=device)  # (n, m)
            groups.append(_Group(rows_t, gu, dt, None if bool(mask.all()) else mask.to(device)))
        direct = len(groups) == 1 and groups[0].rows.reshape(-1).tolist() == list(range(n_rows))
        return cls(n_rows, layers, d, groups, direct, distinct_params, row_units)

    def ffn_delta(self, layer: int, h: torch.Tensor) -> torch.Tensor | None:
        """What the memories add to the FFN output of anchor layer `layer` for input h (B, T, d);
        None when `layer` carries no memory or no row has one."""
        j = self._layer_pos.get(layer)
        if j is None or not self._groups:
            return None
        B, T, d = h.shape
        if B != self.n_rows or d != self.d_model:
            raise MemoryShapeError(f"memory built for {self.n_rows} rows of d={self.d_model}, got {tuple(h.shape)}")
        # one gather of every group's rows (direct: the rows are 0..B-1 in order, h itself)
        xs = h if self._direct else h[self._all_rows]  # (N, T, d), N = sum of n*m over groups
        xs = xs.to(self._groups[0].gu.dtype)  # the memory's dtype (a bfloat16 model may carry float32 memories)
        outs, start = [], 0
        for g in self._groups:
            n, m = g.rows.shape
            U = g.units
            x = xs[start:start + n * m].reshape(n, m * T, d)  # (n, m*T, d)
            start += n * m
            a = torch.bmm(x, g.gu[j].transpose(1, 2))  # (n, m*T, 2U)
            act = F.silu(a[..., :U]) * a[..., U:]  # (n, m*T, U)
            if g.mask is not None:
                act = (act.view(n, m, T, U) * g.mask).view(n, m * T, U)
            outs.append(torch.bmm(act, g.dt[j]).view(n * m, T, d))  # (n*m, T, d)
        out = outs[0] if len(outs) == 1 else torch.cat(outs)  # (N, T, d)
        if self._direct:
            return out.to(h.dtype)
        # a row may sit in several classes (its level-1 class and its private one): sum, out of place
        return h.new_zeros(B, T, d).index_add(0, self._all_rows, out.to(h.dtype))


def _classes(row_blocks: Sequence[Sequence[int]], widths: Sequence[int]):
    """The units of work as (rows, blocks) lists; rows without memory are left out."""
    rows_with = [b for b, ks in enumerate(row_blocks) if ks]
    out = []
    for rows, ks in _components(row_blocks, len(widths), rows_with):
        split = _rowsets(rows, ks, row_blocks)
        # a masked component costs FLOPs, a split one costs ops: pick per component
        masked_cost = len(rows) * sum(widths[k] for k in ks)
        split_cost = sum(len(r) * sum(widths[k] for k in kk) for r, kk in split)
        if len(split) > 1 and masked_cost <= 2 * split_cost:
            out.append((rows, ks))
        else:
            out += split
    return out


def _rowsets(rows: list[int], ks: list[int], row_blocks: Sequence[Sequence[int]]):
    """Split (rows, blocks) into classes of blocks used by exactly the same rows."""
    users: dict[int, list[int]] = {k: [b for b in rows if k in row_blocks[b]] for k in ks}
    by_rows: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for k in ks:
        by_rows[tuple(users[k])].append(k)
    return [(list(r), kk) for r, kk in by_rows.items()]


def _components(row_blocks: Sequence[Sequence[int]], n_blocks: int, rows_with: list[int]):
    """Connected components of the row-block graph as (rows, blocks) lists."""
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
