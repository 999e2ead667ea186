"""8-bit memory blocks: each row of a block quantized on its own (docs/design.md §3, "int8 banks").

A block is `[L_mem, 3, r, d]`: per memory layer the gate and up rows (row k holds memory unit k's input
weights, its output is that unit) and the down rows (row k is the vector unit k writes into the residual).
An int8 bank stores every row as `d` signed bytes followed by its scale as a little-endian float32, so a
row is `d + 4` bytes and a block `[L_mem, 3, r, d + 4]` int8: the scale is per memory unit -- the output
unit of the gate and up products, and the one vector the down product scales. Symmetric, absmax / 127, the
values rounded to nearest: a row's error is at most half a step, `absmax / 254`.

Keeping the scale beside its row keeps a block one contiguous byte string: the shard files, the gRPC
payloads, the crc32c and the model server's block cache carry it as they carry 16-bit blocks, at about half
their bytes (`BankSpec.bytes_per_block`). Blocks are dequantized to the compute dtype where they enter the
slot pools (services/model_server/block_cache.py) and where the evaluation reads them (`Bank.read_block`).
"""

from __future__ import annotations

import numpy as np
import torch

SCALE_BYTES = 4
"""Bytes of a row's scale (float32) after its `d` int8 values."""


def pack_rows(x) -> np.ndarray:
    """Float rows `[..., d]` (numpy or torch) -> int8 `[..., d + 4]`: the quantized row, then its scale."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("cannot quantize a block with NaN or infinite values")
    scale = np.abs(x).max(axis=-1, keepdims=True) / 127.0
    q = np.rint(np.divide(x, scale, out=np.zeros_like(x), where=scale > 0)).clip(-127, 127).astype(np.int8)
    out = np.empty((*x.shape[:-1], x.shape[-1] + SCALE_BYTES), dtype=np.int8)
    out[..., :-SCALE_BYTES] = q
    out[..., -SCALE_BYTES:] = scale.astype("<f4").view(np.int8)
    return out


def unpack_rows(packed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 `[..., d + 4]` (numpy or torch) -> rows `[..., d]` in `dtype`, each times its scale."""
    if isinstance(packed, torch.Tensor):
        packed = packed.numpy()
    packed = np.ascontiguousarray(packed).view(np.int8)
    scale = np.ascontiguousarray(packed[..., -SCALE_BYTES:]).view("<f4")  # [..., 1]
    rows = torch.from_numpy(packed[..., :-SCALE_BYTES].astype(np.float32) * scale)
    return rows if dtype == torch.float32 else rows.to(dtype)


def packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The stored shape of a block of logical `shape` (`[..., d]` -> `[..., d + 4]`)."""
    return (*shape[:-1], shape[-1] + SCALE_BYTES)
