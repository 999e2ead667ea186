"""SlotMemory concatenates a decode row's private blocks (SlotMemory._fuse) up to FUSE_MAX_BYTES: a float32
path of the paper's proportion (r = 256, 64, 16 on 30 layers, 69.7 MB) is concatenated (docs/lm.md, "8
clients with distinct memories": 0.89-1.12x the byte floor at batch 1 concatenated, 1.18-1.34x from its pools),
and the result equals the pooled products."""

from __future__ import annotations

import torch

from services.model_server.slot_memory import FUSE_MAX_BYTES, SlotPools

RANKS, LAYERS, D = (256, 64, 16), 30, 576


def _paths(n_rows: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {(row, level): torch.randn(LAYERS, 3, r, D, generator=g) * 0.02
            for row in range(n_rows) for level, r in enumerate(RANKS)}


def test_a_float32_paper_sized_path_is_concatenated_and_two_are_not():
    blocks = _paths(2)
    pools = SlotPools(list(range(LAYERS)), weight_first=False)
    pools.sync(blocks)
    one = pools.memory_for([[(0, level) for level in range(3)]], fuse=True)
    assert one is not None and one.distinct_nbytes > 64 << 20 and one._fusable
    two = pools.memory_for([[(row, level) for level in range(3)] for row in range(2)], fuse=True)
    assert two is not None and two.distinct_nbytes > FUSE_MAX_BYTES and not two._fusable
    pooled = pools.memory_for([[(0, level) for level in range(3)]], fuse=False)
    assert pooled is not None and not pooled._fusable
    h = torch.randn(1, 1, D, generator=torch.Generator().manual_seed(1))
    for layer in (0, 29):
        torch.testing.assert_close(one.ffn_delta(layer, h), pooled.ffn_delta(layer, h), rtol=1e-4, atol=1e-5)
