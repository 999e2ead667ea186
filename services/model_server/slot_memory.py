"""The serving path of FFN-memories: blocks in slots that persist across batch compositions, rows that point
at them through an index (the LoRA-slot design of vLLM's LoRA manager and LoRAX), used by prefill and
decode alike.

Storage. Blocks of equal rank r share a pool: per-layer buffers GU (L, S, 2r, d) = [gate rows; up rows] and
Dt (L, S, r, d) = M_down transposed, in the compute dtype. `SlotPools.sync(blocks)` makes the pools hold
exactly the blocks of every row the engine has admitted (decoding or prefilling): a block is copied into a
slot once, when its first row is admitted, and stays while any row uses it; a block whose last row left
gives its slot to the block in the pool's last slot (so slots stay 0..n-1). Nothing else is ever copied.

Index. `SlotPools.memory_for(rows)` returns the `SlotMemory` of one forward (a prefill chunk of one row, or
the decode step of the batch): for every pool, which rows use which slot. It is index tensors only
(microseconds), rebuilt whenever the rows or the slots change.

Compute, for memory layer j and input h (B, T, d), per pool with used slots U:

    batched (U spans slots lo..hi-1 with few gaps: the decode batch):
        R_s = rows that use slot s, padded to m = max |R_s| (padding reads row 0; its output is dropped)
        x = h[R]                                       # (n, m*T, d), n = hi - lo
        a = bmm(x, GU[j, lo:hi]ᵀ)                      # (n, m*T, 2r)   one matmul per pool and layer
        y = bmm(silu(a[..., :r]) * a[..., r:], Dt[j, lo:hi])          # (n, m*T, d)
        out[R_s] += y[s]                               # padding dropped
    per slot (few slots far apart: a prefill's own 1-3 blocks among the batch's):
        for s in U:  out[R_s] += (silu(x GU[j,s]ᵀ[:, :r]) * x GU[j,s]ᵀ[:, r:]) Dt[j, s]   with x = h[R_s]

Both read every used block once per forward (views of the pool, never copies), whatever the number of rows
sharing it. The products run as written above (input-first, `h @ Wᵀ`) or weight-first (`W @ hᵀ`), whichever
`measure_orientation` finds faster on this machine at start-up: the same bytes, but oneDNN's few-row kernels
read them at speeds that differ by CPU (docs/lm.md). bench/decode.py measures the cost per step against the memory-bandwidth floor; docs/model_server.md
records why this replaced the other strategies.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypedDict, cast

import torch
import torch.nn.functional as F

from lm.fast import best_time

# The largest concatenated copy a SlotMemory keeps (SlotMemory._fuse): above a float32 path of the paper's
# proportion (69.7 MB), which runs measurably slower from its pools at batch 1 (docs/lm.md, "8 clients with
# distinct memories"). 2-3 rows of bfloat16 paths fit under it too.
FUSE_MAX_BYTES = 128 << 20

log = logging.getLogger(__name__)

# (slots n, rank r, rows per slot t) of the products `measure_orientation` times: a batch-1 path concatenated
# (r = 256 + 64 + 16), and the pooled decode batch's level-1, level-2 and leaf pools
ORIENTATION_SHAPES = ((1, 336, 1), (4, 256, 2), (12, 64, 2), (16, 16, 1))


class Orientation(TypedDict):
    """What `measure_orientation` measured: both orientations' total time over the shapes, and the choice."""

    weight_first_ms: float
    input_first_ms: float
    choice: Literal["weight_first", "input_first"]


@functools.cache
def measure_orientation(dtype: torch.dtype, d: int, repeats: int = 3) -> tuple[bool, Orientation]:
    """Whether the memory MLP's products run weight-first (`W @ hᵀ`) rather than input-first (`h @ Wᵀ`) on this
    machine, and the measurement: the same products, same bytes, but oneDNN's kernels for a few rows read the
    weight at speeds that differ by machine, so which orientation wins differs too (the figures per machine:
    docs/lm.md, "The orientation is measured, not fixed"). Both orientations run the `ORIENTATION_SHAPES`
    over fresh weights of about 16 MB per shape (so they stream from memory, as in a decode step), best of
    `repeats`; weight-first is taken only where it is faster in total. Once per (dtype, d) per process."""
    gen = torch.Generator().manual_seed(0)
    times = {"weight_first_ms": 0.0, "input_first_ms": 0.0}
    with torch.inference_mode():
        for n, r, t in ORIENTATION_SHAPES:
            per_copy = n * 3 * r * d * torch.finfo(dtype).bits // 8
            copies = max(1, (16 << 20) // per_copy)
            gus = (torch.rand(copies, n, 2 * r, d, generator=gen) - 0.5).to(dtype)
            dts = (torch.rand(copies, n, r, d, generator=gen) - 0.5).to(dtype)
            downs = dts.transpose(2, 3).contiguous()  # (copies, n, d, r): a concatenated path's weight-first M_down
            x = (torch.rand(n, t, d, generator=gen) - 0.5).to(dtype)
            for wf, key in ((True, "weight_first_ms"), (False, "input_first_ms")):
                if n == 1:  # a concatenated batch-1 path (SlotMemory._fuse)
                    run = [functools.partial(_fused_mlp, x, gus[c], downs[c] if wf else dts[c], r, wf)
                           for c in range(copies)]
                else:
                    run = [functools.partial(_mlp, x, gus[c], dts[c], r, wf) for c in range(copies)]
                times[key] += best_time(lambda run=run: [f() for f in run], repeats) * 1e3
    times = {k: round(v, 3) for k, v in times.items()}
    choice = times["weight_first_ms"] < times["input_first_ms"]
    log.info("memory products: %s (measured %s, %s, d=%d)", "weight-first" if choice else "input-first",
             times, str(dtype).removeprefix("torch."), d)
    return choice, Orientation(weight_first_ms=times["weight_first_ms"],
                               input_first_ms=times["input_first_ms"],
                               choice="weight_first" if choice else "input_first")


class _Pool:
    """Slots for the blocks of one rank r; slots 0..n-1 are in use, `keys[s]` names the block in slot s."""

    def __init__(self, n_layers: int, r: int, d: int, dtype: torch.dtype, capacity: int = 4) -> None:
        self.r, self.d, self.dtype = r, d, dtype
        self.gu = torch.empty(n_layers, capacity, 2 * r, d, dtype=dtype)  # (L, S, 2r, d)
        self.dt = torch.empty(n_layers, capacity, r, d, dtype=dtype)  # (L, S, r, d)
        self.keys: list[Hashable] = []
        self.copies = 0  # blocks copied in (tests, stats)

    def sync(self, wanted: Mapping[Hashable, torch.Tensor]) -> None:
        """Make slots 0..len(wanted)-1 hold exactly `wanted` (in any order), copying only what entered."""
        s = 0
        while s < len(self.keys):  # drop blocks no row uses, moving the last slot into the hole
            if self.keys[s] in wanted:
                s += 1
                continue
            last = len(self.keys) - 1
            if s != last:
                self.gu[:, s] = self.gu[:, last]
                self.dt[:, s] = self.dt[:, last]
                self.keys[s] = self.keys[last]
            self.keys.pop()
        have = set(self.keys)
        new = [k for k in wanted if k not in have]
        if len(self.keys) + len(new) > self.gu.shape[1]:
            self._grow(max(len(self.keys) + len(new), 2 * self.gu.shape[1]))
        for key in new:
            b = wanted[key]  # (L, 3, r, d)
            s = len(self.keys)
            self.gu[:, s] = b[:, :2].reshape(b.shape[0], 2 * self.r, self.d)
            self.dt[:, s] = b[:, 2]
            self.keys.append(key)
            self.copies += 1

    def _grow(self, capacity: int) -> None:
        n = len(self.keys)
        gu = torch.empty(self.gu.shape[0], capacity, 2 * self.r, self.d, dtype=self.dtype)
        dt = torch.empty(self.dt.shape[0], capacity, self.r, self.d, dtype=self.dtype)
        gu[:, :n], dt[:, :n] = self.gu[:, :n], self.dt[:, :n]
        self.gu, self.dt = gu, dt

    @property
    def nbytes(self) -> int:
        return self.gu.nbytes + self.dt.nbytes


class SlotPools:
    """The pools of one model runner: `sync` the blocks of the admitted rows, then `memory_for` each forward."""

    def __init__(self, layers: Sequence[int], dtype: torch.dtype = torch.float32, *, d: int | None = None,
                 weight_first: bool | None = None) -> None:
        """`weight_first`: the orientation of the memory products (`_mlp`); None measures it for this machine
        (`measure_orientation`, once per process), at once when the model width `d` is given (a server's
        start-up), else when the first block arrives."""
        self.layers = [int(x) for x in layers]
        self.dtype = dtype
        self._weight_first = weight_first
        self.orientation: Orientation | None = None  # the measurement, where one was made
        if weight_first is None and d is not None:
            self.weight_first_for(d)
        self.pools: dict[int, _Pool] = {}
        self.version = 0  # bumped by every sync that changed a slot: plans made before are stale

    def sync(self, blocks: Mapping[Hashable, torch.Tensor]) -> None:
        """Hold exactly `blocks` (key -> (L_mem, 3, r, d)), each in a slot of the pool of its rank."""
        by_rank: dict[int, dict[Hashable, torch.Tensor]] = {}
        for key, b in blocks.items():
            if b.dim() != 4 or b.shape[0] != len(self.layers) or b.shape[1] != 3:
                raise ValueError(f"block {key!r} has shape {tuple(b.shape)}, expected ({len(self.layers)}, 3, r, d)")
            by_rank.setdefault(int(b.shape[2]), {})[key] = b if b.dtype == self.dtype else b.to(self.dtype)
        before = {r: list(p.keys) for r, p in self.pools.items()}
        for r, pool in self.pools.items():
            if r not in by_rank:
                pool.sync({})  # buffers stay allocated for the next batch
        for r, wanted in by_rank.items():
            if r not in self.pools:
                b0 = next(iter(wanted.values()))
                self.pools[r] = _Pool(b0.shape[0], r, b0.shape[3], self.dtype)
            self.pools[r].sync(wanted)
        if {r: p.keys for r, p in self.pools.items()} != before:
            self.version += 1

    def weight_first_for(self, d: int) -> bool:
        if self._weight_first is None:
            self._weight_first, self.orientation = measure_orientation(self.dtype, d)
        return self._weight_first

    def memory_for(self, rows: Sequence[Sequence[Hashable]], fuse: bool = False) -> SlotMemory | None:
        """The memory of one forward whose row b uses the blocks named `rows[b]` (all held: see `sync`);
        None when no row has a block. `fuse`: it will serve several forwards (the decode steps of a batch), so
        concatenating the rows' blocks may pay (`SlotMemory`); a one-shot prefill chunk would only copy."""
        plans = []
        for pool in self.pools.values():
            slot_of = {k: s for s, k in enumerate(pool.keys)}
            users: dict[int, list[int]] = {}
            for b, keys in enumerate(rows):
                for key in keys:
                    s = slot_of.get(key)
                    if s is not None:
                        users.setdefault(s, []).append(b)
            if users:
                plans.append(_plan(pool, users, len(rows)))
        missing = {k for keys in rows for k in keys} - {k for p in self.pools.values() for k in p.keys}
        if missing:
            raise KeyError(f"blocks not synced into the slots: {sorted(map(repr, missing))[:3]}")
        if not plans:
            return None
        return SlotMemory(len(rows), self.layers, plans, fuse, self.weight_first_for(plans[0].pool.d))

    @property
    def nbytes(self) -> int:
        """Bytes of every pool's buffers (resident; they grow to the largest batch's distinct blocks)."""
        return sum(p.nbytes for p in self.pools.values())

    @property
    def copies(self) -> int:
        return sum(p.copies for p in self.pools.values())


@dataclass
class _Batched:
    pool: _Pool
    lo: int
    hi: int  # slots lo..hi-1, one bmm
    m: int  # rows per slot after padding
    gather: torch.Tensor  # (n*m,) row per (slot, position); padding -> row 0 (its output is dropped)
    valid: torch.Tensor  # positions of real rows in the flat layout
    targets: torch.Tensor  # their rows
    direct: bool = False  # slot lo+b serves exactly row b, every row once: h in, y out, no gather or scatter


@dataclass
class _PerSlot:
    pool: _Pool
    slots: list[tuple[int, torch.Tensor | None]]  # (slot, rows using it; None = every row 0..B-1)


def _plan(pool: _Pool, users: dict[int, list[int]], n_rows: int) -> _Batched | _PerSlot:
    lo, hi = min(users), max(users) + 1
    if hi - lo - len(users) > max(1, len(users) // 4):  # too many unused slots in between: one matmul each
        every = list(range(n_rows))
        return _PerSlot(pool, [(s, None if rows == every else torch.tensor(rows, dtype=torch.long))
                               for s, rows in sorted(users.items())])
    m = max(len(rows) for rows in users.values())
    # padding positions gather row 0: each position's MLP is computed on its own, and padding outputs are
    # dropped before the scatter (`valid`), so any row will do (and h needs no zero row appended per layer)
    gather = torch.full((hi - lo, m), -1, dtype=torch.long)
    for s, rows in users.items():
        gather[s - lo, :len(rows)] = torch.tensor(rows, dtype=torch.long)
    flat = gather.reshape(-1)
    valid = (flat >= 0).nonzero().reshape(-1)
    direct = m == 1 and flat.tolist() == list(range(n_rows))  # e.g. batch 1, or private blocks in row order
    return _Batched(pool, lo, hi, m, flat.clamp(min=0), valid, flat[valid], direct)


def _views(p: _Batched | _PerSlot, j: int) -> tuple[torch.Tensor, torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]]:
    """Memory layer j's weights of plan p: (gu, dt) of its slots lo..hi-1, or [(gu, dt)] per slot."""
    if isinstance(p, _PerSlot):
        return [(p.pool.gu[j, s], p.pool.dt[j, s]) for s, _ in p.slots]
    return p.pool.gu[j, p.lo:p.hi], p.pool.dt[j, p.lo:p.hi]


def _mlp(x: torch.Tensor, gu: torch.Tensor, dt: torch.Tensor, r: int, weight_first: bool) -> torch.Tensor:
    """(silu(x G^T) * (x U^T)) M_down for n slots at once: x (n, t, d), gu (n, 2r, d), dt (n, r, d) -> (n, t, d).
    `weight_first`: the first product as GU @ xᵀ, the activation transposed into the second (`measure_orientation`
    decides which oneDNN reads faster on this machine)."""
    if weight_first:
        a = torch.bmm(gu, x.transpose(1, 2))  # (n, 2r, t)
        return torch.bmm((F.silu(a[:, :r]) * a[:, r:]).transpose(1, 2), dt)  # (n, t, r) @ (n, r, d)
    a = torch.bmm(x, gu.transpose(1, 2))  # (n, t, 2r)
    return torch.bmm(F.silu(a[..., :r]) * a[..., r:], dt)  # (n, t, r) @ (n, r, d)


def _fused_mlp(h: torch.Tensor, gu: torch.Tensor, down: torch.Tensor, u: int, weight_first: bool) -> torch.Tensor:
    """A concatenated path per row: h (B, T, d), gu (B, 2U, d), `down` M_down as (B, d, U) when `weight_first`
    (both products `W @ hᵀ`), else (B, U, d) -> (B, T, d)."""
    if not weight_first:
        return _mlp(h, gu, down, u, weight_first=False)  # the pooled products, one "slot" per row
    a = torch.bmm(gu, h.transpose(1, 2))  # (B, 2U, T)
    return torch.bmm(down, F.silu(a[:, :u]) * a[:, u:]).transpose(1, 2)  # (B, d, T) -> (B, T, d)


class SlotMemory:
    """One forward's memories (`lm.model.FFNMemory`): `n_rows`, `ffn_delta(layer, h)`."""

    def __init__(self, n_rows: int, layers: list[int], plans: list[_Batched | _PerSlot], fuse: bool = False,
                 weight_first: bool = False) -> None:
        self.n_rows = n_rows
        self.weight_first = weight_first  # the products' orientation (`measure_orientation`)
        self._layer_pos = {layer: j for j, layer in enumerate(layers)}
        self._plans = sorted(plans, key=lambda p: not (isinstance(p, _Batched) and p.direct))  # direct first
        self.distinct_nbytes = 0  # bytes of the blocks one forward reads
        for p in plans:
            per_slot = (p.pool.gu[0, 0].numel() + p.pool.dt[0, 0].numel()) * p.pool.gu.element_size() \
                * p.pool.gu.shape[0]
            self.distinct_nbytes += per_slot * (p.hi - p.lo if isinstance(p, _Batched) else len(p.slots))
        # asked to (`fuse`: a decode batch), every plan direct (row b uses slot lo+b of each pool: batch 1, or
        # rows with private blocks only) and more than one pool: the pools' blocks are concatenated once, on
        # first use, into one (2U, d) / (U, d) pair per row and layer, so a layer is 2 bmm instead of 2 per
        # pool (a path of 3 levels on 30 layers at batch 1: 90 fewer matmuls and their element-wise ops per
        # decode step). A copy of what the forward reads, kept only while it is small (FUSE_MAX_BYTES) and
        # reused by every decode step of the batch
        self._fusable = (fuse and len(plans) > 1 and all(isinstance(p, _Batched) and p.direct for p in plans)
                         and self.distinct_nbytes <= FUSE_MAX_BYTES)
        self._fused: tuple[torch.Tensor, torch.Tensor] | None = None
        # each plan's per-layer views of its pool ((gu, dt) of slots lo..hi-1, or of each slot), taken once
        # instead of in every layer of every step (select/slice/as_strided were ~2% of a batch-16 step's
        # profiled memory time); none for a fused memory, which reads its own copy. Valid until the pools' next
        # sync that changes a slot, as the plans themselves (`SlotPools.version`)
        self._views: list[list] = [] if self._fusable else [[_views(p, j) for j in range(len(layers))]
                                                            for p in self._plans]

    def _fuse(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._fused is None:
            plans = cast("list[_Batched]", self._plans)
            gates = [p.pool.gu[:, p.lo:p.hi, :p.pool.r] for p in plans]
            ups = [p.pool.gu[:, p.lo:p.hi, p.pool.r:] for p in plans]
            # M_down stored (d, U) when both products run weight-first (W @ hᵀ), else (U, d)
            down = torch.cat([p.pool.dt[:, p.lo:p.hi] for p in plans], dim=2)  # (L, B, U, d)
            self._fused = (torch.cat(gates + ups, dim=2),  # (L, B, 2U, d)
                           down.transpose(2, 3).contiguous() if self.weight_first else down)
        return self._fused

    def ffn_delta(self, layer: int, h: torch.Tensor) -> torch.Tensor | None:
        j = self._layer_pos.get(layer)
        if j is None:
            return None
        B, T, d = h.shape
        if self._fusable:
            gu, down = self._fuse()
            return _fused_mlp(h, gu[j], down[j], gu.shape[2] // 2, self.weight_first)
        out: torch.Tensor | None = None  # the first direct plan writes it, the others add into it
        for p, views in zip(self._plans, self._views, strict=True):
            r = p.pool.r
            if isinstance(p, _PerSlot):
                if out is None:
                    out = torch.zeros_like(h)
                for (_, rows), (gu, dt) in zip(p.slots, views[j], strict=True):
                    x = h if rows is None else h.index_select(0, rows)  # (m, T, d)
                    a = x @ gu.T  # (m, T, 2r)
                    y = (F.silu(a[..., :r]) * a[..., r:]) @ dt  # (m, T, d)
                    if rows is None:
                        out.add_(y)
                    else:
                        out.index_add_(0, rows, y)
                continue
            gu, dt = views[j]
            if p.direct:
                y = _mlp(h, gu, dt, r, self.weight_first)  # (B, T, d)
                out = y if out is None else out.add_(y)
                continue
            if out is None:
                out = torch.zeros_like(h)
            n = p.hi - p.lo
            x = h.index_select(0, p.gather).reshape(n, p.m * T, d)  # (n, m*T, d)
            y = _mlp(x, gu, dt, r, self.weight_first).reshape(n * p.m, T, d)
            if p.valid.numel() != n * p.m:
                y = y.index_select(0, p.valid)
            out.index_add_(0, p.targets, y)
        return out


__all__ = ["SlotMemory", "SlotPools"]
