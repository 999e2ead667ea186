"""Random memory blocks of the paper's proportion, for demos and benchmarks (no bank needed)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lm.model import ModelConfig

PAPER_RANKS = (256, 64, 16)  # r per level of the paper's SmolLM2-scale setting (docs/design.md §1)


def random_block(n_mem_layers: int, r: int, d: int, *, seed: int, gate_std: float = 0.02,
                 down_std: float = 1e-3, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One block (L_mem, 3, r, d): truncated-normal M_gate/M_up of std `gate_std` (the paper's init) and a
    small random M_down (transposed) of std `down_std` so the output moves a little but stays sensible."""
    g = torch.Generator().manual_seed(seed)
    blk = torch.empty(n_mem_layers, 3, r, d)
    blk[:, :2] = torch.randn(n_mem_layers, 2, r, d, generator=g).clamp_(-2, 2) * gate_std
    blk[:, 2] = torch.randn(n_mem_layers, r, d, generator=g) * down_std
    return blk.to(dtype)


def random_path(config: ModelConfig, ranks: Sequence[int] = PAPER_RANKS, layers: Sequence[int] | None = None,
                *, seed: int = 0, down_std: float = 1e-3) -> tuple[list[torch.Tensor], list[int]]:
    """The blocks of one random path (one block per level) and the memory layers (default: every layer)."""
    layers = list(range(config.n_layers)) if layers is None else list(layers)
    blocks = [random_block(len(layers), r, config.d_model, seed=seed * 1000 + lvl, down_std=down_std)
              for lvl, r in enumerate(ranks)]
    return blocks, layers
