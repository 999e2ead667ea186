"""The anchor's math: equality with transformers' Llama, and FFN-memory identities."""

from __future__ import annotations

import copy

import pytest
import torch

from lm.memory_batch import MemoryBatch
from lm.model import ModelConfig, Transformer
from lm.weights import _to_state_dict
from tests.lm.conftest import random_block, rel_err, tiny_model


@pytest.mark.parametrize("tied", [True, False])
def test_logits_equal_transformers_llama(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hc = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5,
                     tie_word_embeddings=tied, max_position_embeddings=64)
    hf = LlamaForCausalLM(hc).eval()
    with torch.no_grad():  # HF init leaves norms at 1; perturb them so they are tested too
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ours = Transformer(ModelConfig.from_hf(hc.to_dict()))
    ours.load_state_dict(_to_state_dict(ours, hf.state_dict()))
    ours.eval()
    ids = torch.randint(0, 100, (2, 11))
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids).logits) <= 1e-4


def _wide_anchor(model: Transformer, blocks: list[torch.Tensor], layers: list[int]) -> Transformer:
    """The paper's identity: an anchor whose gate/up/down are concatenated with the blocks' units.
    Layers without memory get the same number of extra units with a zero down projection."""
    r = sum(b.shape[2] for b in blocks)
    cfg = copy.deepcopy(model.config)
    cfg.ffn_dim += r
    wide = Transformer(cfg).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}.mlp."
        if i in layers:
            j = layers.index(i)
            g = torch.cat([b[j, 0] for b in blocks])
            u = torch.cat([b[j, 1] for b in blocks])
            dt = torch.cat([b[j, 2] for b in blocks])
        else:
            g = u = torch.randn(r, cfg.d_model)
            dt = torch.zeros(r, cfg.d_model)
        gate, up = sd[p + "gate_up_proj.weight"].chunk(2)
        sd[p + "gate_up_proj.weight"] = torch.cat([gate, g, up, u])
        sd[p + "down_proj.weight"] = torch.cat([sd[p + "down_proj.weight"], dt.T], dim=1)
    wide.load_state_dict(sd)
    return wide


@pytest.mark.parametrize("layers", [[0, 1, 2], [2], [0, 2]])
def test_block_injection_equals_concatenated_ffn(model, layers):
    d = model.config.d_model
    blocks = [random_block(len(layers), r, d, seed=s) for s, r in ((1, 8), (2, 4), (3, 2))]
    mb = MemoryBatch.build(blocks, [[0, 1, 2]], layers)
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        ours = model(ids, memory=mb)
        wide = _wide_anchor(model, blocks, layers)(ids)
        anchor = model(ids)
    assert rel_err(ours, wide) <= 1e-5
    assert rel_err(ours, anchor) > 1e-3  # the memory really changed something


def test_zero_down_leaves_logits_unchanged(model):
    d = model.config.d_model
    blk = random_block(3, 16, d, seed=5, down_std=0.0)
    assert blk[:, 2].abs().sum() == 0 and blk[:, :2].abs().sum() > 0
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids, memory=MemoryBatch.build([blk], [[0], [0]], [0, 1, 2])), model(ids))


def test_batch_of_different_memories_equals_each_row_alone(model):
    d = model.config.d_model
    layers = [0, 1, 2]
    # a small tree: two level-1 nodes (r=8), three level-2 nodes (r=4), four level-3 nodes (r=2)
    blocks = [random_block(3, r, d, seed=10 + i) for i, r in enumerate((8, 8, 4, 4, 4, 2, 2, 2, 2))]
    row_blocks = [[0, 2, 5], [0, 2, 6], [0, 3, 7], [1, 4, 8], [], [1], [0, 2]]  # shared, single, none, short
    ids = torch.randint(0, 128, (len(row_blocks), 6))
    mb = MemoryBatch.build(blocks, row_blocks, layers)
    assert mb.row_units == [14, 14, 14, 14, 0, 8, 12]
    with torch.no_grad():
        batched = model(ids, memory=mb)
        for b, ks in enumerate(row_blocks):
            alone = model(ids[b:b + 1], memory=MemoryBatch.build([blocks[k] for k in ks], [list(range(len(ks)))],
                                                                 layers))
            assert rel_err(batched[b:b + 1], alone) <= 1e-5, b


def test_shared_blocks_are_prepared_once():
    d, layers = 16, [0]
    blocks = [random_block(1, r, d, seed=i) for i, r in enumerate((8, 4, 4))]
    grouped = MemoryBatch.build(blocks, [[0, 1], [0, 2], [0, 1]], layers)
    assert grouped.distinct_params == 16 * 3 * d
    assert grouped.prepared_nbytes == grouped.distinct_nbytes  # each distinct block stored once


def test_memory_rejects_mismatched_shapes(model):
    from lm.errors import MemoryShapeError

    with pytest.raises(MemoryShapeError):
        MemoryBatch.build([torch.zeros(2, 3, 4, 32)], [[0]], [0, 1, 2])
    mb = MemoryBatch.build([torch.zeros(3, 3, 4, 32)], [[0]], [0, 1, 2])
    with pytest.raises(ValueError):
        model(torch.zeros(2, 3, dtype=torch.long), memory=mb)  # built for one row


def test_hidden_at_and_forward_from_resume_the_forward(model):
    d = model.config.d_model
    blocks = [random_block(2, 8, d, seed=1), random_block(2, 4, d, seed=2)]
    mb = MemoryBatch.build(blocks, [[0, 1], [0]], [1, 2])
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        full = model(ids, memory=mb)
        h = model.hidden_at(ids, 1)
        assert h.shape == (2, 5, d)
        assert rel_err(model.forward_from(h, 1, memory=mb), full) <= 1e-6
        select = torch.zeros(2, 5, dtype=torch.bool)
        select[0, 1] = select[1, 4] = True
        picked = model.forward_from(h, 1, memory=mb, select=select)  # (2, V): only the selected positions
        assert picked.shape == (2, model.config.vocab_size)
        assert rel_err(picked, full[select]) <= 1e-6


class _RowLoopMemory:
    """An FFNMemory written from the formula, row by row, without MemoryBatch: the protocol is all that
    Transformer needs (the model server's slot memories rely on it)."""

    def __init__(self, blocks: list[torch.Tensor], row_blocks: list[list[int]], layers: list[int]):
        self.blocks, self.row_blocks, self.layers = blocks, row_blocks, layers
        self.n_rows = len(row_blocks)

    def ffn_delta(self, layer: int, h: torch.Tensor) -> torch.Tensor | None:
        if layer not in self.layers:
            return None
        j = self.layers.index(layer)
        out = torch.zeros_like(h)  # (B, T, d)
        for b, ks in enumerate(self.row_blocks):
            for k in ks:
                gate, up, down_t = self.blocks[k][j]  # each (r, d)
                out[b] += (torch.nn.functional.silu(h[b] @ gate.T) * (h[b] @ up.T)) @ down_t
        return out


def test_any_ffn_memory_protocol_object_is_accepted(model):
    d = model.config.d_model
    blocks = [random_block(2, 8, d, seed=3), random_block(2, 4, d, seed=4)]
    row_blocks, layers = [[0, 1], [], [1]], [0, 2]
    mine = _RowLoopMemory(blocks, row_blocks, layers)
    mb = MemoryBatch.build(blocks, row_blocks, layers)
    ids = torch.randint(0, 128, (3, 6))
    with torch.no_grad():
        ref = model(ids, memory=mb)
        assert rel_err(model(ids, memory=mine), ref) <= 1e-5
        assert rel_err(model(ids), ref) > 1e-3  # the memory does change the logits
        assert rel_err(model.forward_from(model.hidden_at(ids, 0), 0, memory=mine), ref) <= 1e-5


def test_memory_is_trainable_through_the_batch(model):
    d = model.config.d_model
    params = [torch.nn.Parameter(random_block(3, r, d, seed=s)) for s, r in ((1, 8), (2, 4), (3, 4))]
    ids = torch.randint(0, 128, (2, 5))
    mb = MemoryBatch.build(list(params), [[0, 1], [0, 2]], [0, 1, 2])
    model.requires_grad_(False)
    loss = model(ids, memory=mb).logsumexp(-1).mean()
    loss.backward()
    for p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0
    # the gradient of a shared block equals the sum of what each row alone gives it
    g_shared = params[0].grad.clone()
    total = torch.zeros_like(g_shared)
    for b, ks in enumerate([[0, 1], [0, 2]]):
        for p in params:
            p.grad = None
        mb1 = MemoryBatch.build([params[k] for k in ks], [[0, 1]], [0, 1, 2])
        (model(ids[b:b + 1], memory=mb1).logsumexp(-1).sum() / ids.numel()).backward()
        total += params[0].grad
    assert rel_err(g_shared, total) <= 1e-4


def test_tiny_random_model_is_deterministic():
    a, b = tiny_model(seed=3), tiny_model(seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert a.lm_head.weight is a.model.embed_tokens.weight  # tied


def test_grouped_masks_small_subtrees_and_splits_large_ones():
    """Two rows under one level-1 node: one masked class (little waste, fewer ops). Eight rows under one
    level-1 node with private deep blocks: split into row-set classes (masking would waste 5x the FLOPs)."""
    d, layers = 8, [0]
    small = [random_block(1, r, d, seed=i) for i, r in enumerate((16, 4, 4))]
    mb = MemoryBatch.build(small, [[0, 1], [0, 2]], layers)
    assert [(tuple(g.rows.shape), g.units, g.mask is not None) for g in mb._groups] == [((1, 2), 24, True)]
    large = [random_block(1, r, d, seed=i) for i, r in enumerate((16,) + (8,) * 8)]
    mb = MemoryBatch.build(large, [[0, 1 + b] for b in range(8)], layers)
    shapes = sorted((tuple(g.rows.shape), g.units, g.mask is None) for g in mb._groups)
    assert shapes == [((1, 8), 16, True), ((8, 1), 8, True)]
