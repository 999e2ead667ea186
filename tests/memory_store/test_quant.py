"""int8 banks (memory_store/quant.py): rows quantized with their own scales, stored, served and converted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from memory_store import Bank
from memory_store.ops import reshard, rewrite_bank, verify_bank
from memory_store.quant import pack_rows, unpack_rows

from .conftest import tiny_spec, write_bank


def _bound(x: np.ndarray) -> np.ndarray:
    """Half a quantization step of each row: the most a value may move."""
    return np.abs(x).max(-1, keepdims=True) / 254 * (1 + 1e-5) + 1e-12


def test_each_row_moves_by_at_most_half_its_own_step():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 6, 40)).astype(np.float32) * rng.uniform(1e-4, 3, (2, 3, 6, 1)).astype(np.float32)
    x[1, 2, 3] = 0.0  # an all-zero row stays zero (its scale is 0)
    packed = pack_rows(x)
    assert packed.dtype == np.int8 and packed.shape == (2, 3, 6, 44)
    y = unpack_rows(packed).numpy()
    assert (np.abs(y - x) <= _bound(x)).all()
    assert (y[1, 2, 3] == 0).all()
    # a small row keeps its precision beside a large one: the scale is the row's, not the block's
    assert np.abs(y[0, 0, 0] - x[0, 0, 0]).max() <= np.abs(x[0, 0, 0]).max() / 254 * 1.0001
    assert unpack_rows(torch.from_numpy(packed), torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="NaN"):
        pack_rows(np.full((2, 4), np.nan, dtype=np.float32))


def test_an_int8_bank_stores_about_a_quarter_of_float32_and_reads_back_within_the_bound(tmp_path):
    spec = tiny_spec(dtype="int8")
    f32 = tiny_spec(dtype="float32")
    assert spec.bytes_per_block(1) == 2 * 3 * 4 * (8 + 4)  # [L, 3, r, d] int8 + a float32 scale per row
    assert spec.bank_bytes < f32.bank_bytes / 2 and spec.fetched_bytes == sum(spec.bytes_per_block(lv) for lv in (1, 2))
    bank_id, blocks, generic = write_bank(tmp_path / "b", spec)
    bank = Bank.open(tmp_path / "b")
    assert verify_bank(tmp_path / "b").ok
    for ref, block in blocks.items():
        got = bank.read_block(ref)
        assert got.dtype == torch.float32 and tuple(got.shape) == spec.block_shape(ref.level)
        assert (np.abs(got.numpy() - block) <= _bound(block)).all()
        packed = bank.read_block(ref, packed=True)
        assert packed.dtype == torch.int8 and tuple(packed.shape) == spec.stored_shape(spec.block_shape(ref.level))
        assert torch.equal(unpack_rows(packed), got)
        assert bank.block_info(ref).nbytes == packed.numel() == spec.bytes_per_block(ref.level)
    assert (np.abs(bank.generic_block().numpy() - generic) <= _bound(generic)).all()
    sid = bank.shard_ids[0]
    with safe_open(tmp_path / "b" / "shards" / sid / "level-1.safetensors", framework="np") as f:
        key = next(iter(f.keys()))
        assert f.get_tensor(key).dtype == np.int8 and f.get_tensor(key).shape == (2, 3, 4, 12)  # plain safetensors
    # a reshard copies the packed bytes (the generic memory too): the same bank, not quantized again
    assert reshard(tmp_path / "b", 1, out=tmp_path / "one") == bank_id


def test_convert_quantizes_a_float_bank_and_a_second_convert_does_not_drift(tmp_path):
    spec = tiny_spec(dtype="float32")
    src_id, blocks, _ = write_bank(tmp_path / "f32", spec)
    q_id = rewrite_bank(tmp_path / "f32", tmp_path / "q", dtype="int8")
    assert q_id != src_id
    q = Bank.open(tmp_path / "q")
    assert q.spec.dtype == "int8" and q.spec.model_copy(update={"dtype": "float32"}) == spec
    for ref, block in blocks.items():
        assert (np.abs(q.read_block(ref).numpy() - block) <= _bound(block)).all()
    # back to float32 holds exactly the dequantized values
    back_id = rewrite_bank(tmp_path / "q", tmp_path / "back", dtype="float32")
    back = Bank.open(tmp_path / "back")
    assert back.spec == spec and back_id not in (src_id, q_id)
    assert all(torch.equal(back.read_block(r), q.read_block(r)) for r in blocks)
    assert (tmp_path / "q" / "router.json").exists() == (tmp_path / "f32" / "router.json").exists()
