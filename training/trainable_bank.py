"""The trainable memory bank: one parameter per tree node (and one generic memory), in block layout.

Every node's block is its own ``nn.Parameter`` of shape ``[L_mem, 3, r_l, d]`` (slot 0 = M_gate, 1 = M_up,
2 = M_down transposed: the bank's block layout, so export is a plain copy). Keeping nodes separate means a
training step only produces gradients for the nodes on the paths it used; with ``zero_grad(set_to_none=True)``
AdamW then skips every other node (no weight decay, no stale momentum), as if each node were trained only on
its own cluster's documents -- which is what the paper's per-cluster memory training does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

INIT_STD = 0.02
_GENERIC = ("generic",)  # the key of the generic memory among a batch's block keys (paths are (level, node))
_SHARED = ("shared",)  # the training-only shared block (--shared-prob)


def init_block(shape: Sequence[int], generator: torch.Generator, std: float = INIT_STD) -> torch.Tensor:
    """Gate and up: truncated normal (std, cut at 2 std); down: zero, so a fresh memory changes nothing."""
    block = torch.zeros(*shape)
    gu = torch.empty(shape[0], 2, *shape[2:])
    nn.init.trunc_normal_(gu, std=std, a=-2 * std, b=2 * std, generator=generator)
    block[:, :2] = gu
    return block


class TrainableBank(nn.Module):
    """Trainable blocks for the nodes of a tree (optionally only one level-1 subtree's) + the generic memory.

    Args:
        branching: children per node per level (the tree's).
        ranks: r_l per level.
        n_mem_layers: L_mem.
        d_model: d.
        subtree: if given, only blocks of level-1 node `subtree` and its descendants exist.
        parents: per level, the parent index of every node (tree.parents), needed with `subtree`.
        shared: also hold a training-only block of the generic's size that paths may carry in training
            (TrainConfig.shared_prob); it is not part of the bank.
    """

    def __init__(self, branching: Sequence[int], ranks: Sequence[int], n_mem_layers: int, d_model: int,
                 seed: int = 0, subtree: int | None = None, parents: Sequence | None = None, shared: bool = False):
        super().__init__()
        self.branching, self.ranks = list(branching), list(ranks)
        self.n_mem_layers, self.d_model = n_mem_layers, d_model
        self.subtree = subtree
        g = torch.Generator().manual_seed(seed)
        self.nodes = nn.ParameterDict()
        n = 1
        owned: set[int] = set()  # the nodes held at the level above
        for level, (k, r) in enumerate(zip(self.branching, self.ranks, strict=True), start=1):
            n *= k
            indices: Sequence[int]
            if subtree is None:
                indices = range(n)
            elif level == 1:
                indices = [subtree]
            else:
                if parents is None:
                    raise ValueError("TrainableBank(subtree=...) needs the tree's parents below level 1")
                par = parents[level - 1]
                indices = [i for i in range(n) if int(par[i]) in owned]
            owned = set(indices)
            for i in indices:
                self.nodes[self.key(level, i)] = nn.Parameter(init_block((n_mem_layers, 3, r, d_model), g))
        self.generic = nn.Parameter(init_block((n_mem_layers, 3, sum(self.ranks), d_model), g))
        # a training-only block summed into paths (`--shared-prob`), never exported
        self.shared = nn.Parameter(init_block((n_mem_layers, 3, sum(self.ranks), d_model), g)) if shared else None

    def freeze(self, values: dict[str, torch.Tensor], trainable: set[str]) -> None:
        """Train only the blocks named in `trainable`: every other block, and the generic memory, takes no
        gradient; those named in `values` first take that value (the blocks of a bank being updated,
        training/update.py). AdamW skips a parameter without a gradient, so a frozen block stays bit for bit."""
        for k, p in self.nodes.items():
            if k in values:
                with torch.no_grad():
                    p.copy_(values[k].to(p.dtype))
            p.requires_grad_(k in trainable)
        self.generic.requires_grad_(False)

    @staticmethod
    def key(level: int, index: int) -> str:
        return f"{level}_{index}"

    def param_groups(self, lr: float, level_lr: Sequence[float] | None = None) -> list[dict]:
        """AdamW parameter groups: the generic memory at `lr`, the tree's blocks at `lr` times their level's
        multiplier (`level_lr`, one per level; default 1)."""
        scale = list(level_lr) if level_lr is not None else [1.0] * len(self.ranks)
        if len(scale) != len(self.ranks):
            raise ValueError(f"level_lr has {len(scale)} entries, the tree {len(self.ranks)} levels")
        groups: list[dict] = [{"params": [self.generic] + ([self.shared] if self.shared is not None else []),
                               "lr": lr}]
        for level, s in enumerate(scale, start=1):
            ps = [p for k, p in self.nodes.items() if int(k.split("_")[0]) == level]
            if ps:
                groups.append({"params": ps, "lr": lr * float(s)})
        return groups

    def block(self, level: int, index: int) -> nn.Parameter:
        return self.nodes[self.key(level, index)]

    def memory_batch(self, paths: Sequence[Sequence[int]], layers: list[int], generic: bool | Sequence[bool] = False,
                     shared: Sequence[bool] | None = None):
        """`lm.MemoryBatch` for rows with these paths (distinct blocks listed once) on anchor `layers`; a row
        whose `generic` flag is set (one flag for all rows, or one per row) uses the generic memory instead of
        its path; a path row whose `shared` flag is set also carries the training-only shared block."""
        from lm import MemoryBatch

        flags = [generic] * len(paths) if isinstance(generic, bool) else list(generic)
        extra = list(shared) if shared is not None else [False] * len(paths)
        refs = [[_GENERIC] if g else [(level, int(i)) for level, i in enumerate(path, start=1)] + [_SHARED] * sh
                for path, g, sh in zip(paths, flags, extra, strict=True)]
        return MemoryBatch.from_paths(refs, self._block_of, layers)

    def _block_of(self, key) -> torch.Tensor:
        if key == _GENERIC:
            return self.generic
        if key == _SHARED:
            if self.shared is None:
                raise RuntimeError("no shared block: --shared-prob is 0")
            return self.shared
        return self.block(*key)

