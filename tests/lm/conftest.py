"""Tiny configs and helpers for the lm tests (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch

from lm.model import ModelConfig, Transformer


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=128, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=48,
                rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True, max_seq_len=64, bos_token_id=1,
                eos_token_ids=[2])
    base.update(overrides)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    return Transformer(tiny_config(**overrides)).init_weights(seed=seed, std=0.1).eval()


def random_block(n_layers: int, r: int, d: int, seed: int, down_std: float = 0.1) -> torch.Tensor:
    """(L_mem, 3, r, d): gate/up of std 0.1, M_down (transposed) of std `down_std`."""
    g = torch.Generator().manual_seed(seed)
    blk = torch.randn(n_layers, 3, r, d, generator=g) * 0.1
    blk[:, 2] = torch.randn(n_layers, r, d, generator=g) * down_std
    return blk


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture
def model() -> Transformer:
    return tiny_model()


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2 anchor, loaded once per session (converted on first use, then cached)."""
    from lm import load_anchor

    return load_anchor("smollm2")


@pytest.fixture(scope="session")
def tiny_anchor():
    from lm import load_anchor

    return load_anchor("tiny")
