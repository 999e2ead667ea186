"""Random-weight banks of any layout, streamed to disk with bounded RAM (for benchmarks and demos)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from memory_store.spec import AnchorIdentity, BankSpec, NodeRef
from memory_store.tree import random_tree
from memory_store.writer import BankWriter, to_bank_bytes

log = logging.getLogger(__name__)

# The paper-scale bank for SmolLM2-135M: levels 16/256/4096, r = (256, 64, 16), all 30 layers of d = 576.
# "anchor": the anchor whose identity (and depth and width) the bank is written for by `hiermem bank synth`,
# so the model server serving that anchor accepts it; None = the synthetic identity (SYNTH_ANCHOR).
PRESETS: dict[str, dict] = {
    "paper-smollm2": dict(branching=[16, 16, 16], ranks=[256, 64, 16], memory_layers=list(range(30)),
                          n_layers=30, d_model=576, dtype="float16", anchor="smollm2"),
    "tiny": dict(branching=[2, 2], ranks=[4, 2], memory_layers=[0, 1], n_layers=2, d_model=8, dtype="float32",
                 anchor=None),
}
SYNTH_ANCHOR = AnchorIdentity(arch="synthetic", hash="random")
_POOL_EXTRA = 1 << 22  # values beyond the largest block, so windows at random offsets differ per node


def _pool(spec: BankSpec, rng: np.random.Generator, std: float) -> np.ndarray:
    """One buffer of random values in the bank dtype; every block is a window of it at a random offset,
    so generation costs no arithmetic per block and the build is I/O-bound."""
    n = max(spec.params_per_block(lv) for lv in range(1, spec.depth + 1)) + _POOL_EXTRA
    rows = -(-n // spec.d_model)  # whole rows: an int8 row carries its scale (windows start at row bounds)
    vals = rng.standard_normal((rows, spec.d_model), dtype=np.float32) * np.float32(std)
    return np.frombuffer(to_bank_bytes(vals, spec, vals.shape), dtype=np.uint8).copy()


def synth_bank(out: str | Path, spec: BankSpec, n_shards: int = 1, *, seed: int = 0, std: float = 0.02,
               anchor: AnchorIdentity = SYNTH_ANCHOR, generic: bool = True, overwrite: bool = False,
               progress: bool = False) -> str:
    """Write a random bank: random unit centroids (children near their parents), small random blocks.
    Returns its bank_id."""
    rng = np.random.default_rng(seed)
    tree = random_tree(list(spec.branching), spec.embedder_dim, seed=seed)
    pool = _pool(spec, rng, std)
    step = spec.row_bytes  # windows start at a row
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=spec.bank_bytes, unit="B", unit_scale=True, desc=f"synth {Path(out).name}")
    with BankWriter(out, spec, anchor, tree, n_shards, overwrite=overwrite) as w:
        for level in range(1, spec.depth + 1):
            nbytes = spec.bytes_per_block(level)
            starts = rng.integers(0, (len(pool) - nbytes) // step, spec.nodes_at(level)) * step
            for index, start in enumerate(starts):
                w.write_block_bytes(NodeRef(level, index), pool.data[start:start + nbytes])
                if bar is not None:
                    bar.update(nbytes)
        if generic:
            shape = spec.generic_shape
            n = int(np.prod(shape[:-1])) * step
            start = int(rng.integers(0, (len(pool) - n) // step)) * step if n < len(pool) else 0
            raw = pool[start:start + n] if n <= len(pool) else np.resize(pool, n)
            if spec.dtype == "int8":  # packed rows (values + scales), which the writer takes as stored
                w.write_generic(raw.view(np.int8).reshape(spec.stored_shape(shape)))
            else:
                vals = np.frombuffer(raw, dtype=np.uint16 if spec.dtype == "bfloat16" else spec.dtype)
                w.write_generic(vals.reshape(shape))
    if bar is not None:
        bar.close()
    log.info("synthetic bank %s: %.2f GB, %d shards, bank_id %s", out, spec.bank_bytes / 1e9, n_shards,
             w.bank_id[:12])
    return w.bank_id
