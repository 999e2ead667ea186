"""Where blocks live: shards own whole subtrees cut at the shard level; the manifest and the content hash."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np

from memory_store.errors import BankError
from memory_store.spec import ST_DTYPE, BankSpec, NodeRef

FORMAT = "hiermem-bank/1"
MANIFEST = "manifest.json"
TREE_FILE = "tree.safetensors"
GENERIC_FILE = "generic.safetensors"
# Written by the trainer beside the blocks (training/trainer.py), carried by every bank operation that
# rewrites a bank, read by `hiermem bank update`: the documents the blocks were trained on, each with its
# path, and the settings that trained them. Not part of bank_id, which covers the blocks and the tree.
DOCUMENTS_FILE = "documents.jsonl"
TRAINING_FILE = "training.json"


def shard_ids(n_shards: int) -> list[str]:
    return [str(i) for i in range(n_shards)]


def split_subtrees(spec: BankSpec, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal ranges [start, end) of shard-level nodes, one per shard."""
    n = spec.nodes_at(spec.shard_level)
    if not 1 <= n_shards <= n:
        raise BankError(f"n_shards must be in 1..{n} (nodes at shard level {spec.shard_level}), got {n_shards}")
    bounds = np.linspace(0, n, n_shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds, bounds[1:], strict=False)]


def nodes_in_shard(spec: BankSpec, subtrees: tuple[int, int], level: int) -> range:
    """Indices at `level` that a shard owning shard-level nodes [start, end) stores.

    Below (and at) the shard level: its subtrees' nodes. Above it: every ancestor of those subtrees
    (such nodes are stored in each shard that owns a subtree below them)."""
    start, end = subtrees
    sl = spec.shard_level
    if level >= sl:
        span = math.prod(spec.branching[sl:level])
        return range(start * span, end * span)
    span = math.prod(spec.branching[level:sl])
    return range(start // span, (end - 1) // span + 1)


def tensor_name(index: int) -> str:
    return f"n{index}"


def level_file(shard_id: str, level: int) -> str:
    return f"shards/{shard_id}/level-{level}.safetensors"


def st_dtype(spec: BankSpec) -> str:
    return ST_DTYPE[spec.dtype]


def content_hash(spec: BankSpec, anchor: dict[str, Any], tree_crc: int, generic_crc: int | None,
                 crcs: dict[int, list[int]], present: dict[int, list[bool]]) -> str:
    """bank_id: sha256 over everything a block's bytes depend on, never over the shard layout."""
    h = hashlib.sha256()
    h.update(FORMAT.encode())
    h.update(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode())
    h.update(json.dumps(anchor, sort_keys=True).encode())
    h.update(f"tree:{tree_crc};generic:{generic_crc}".encode())
    for level in sorted(crcs):
        h.update(f"level:{level}".encode())
        h.update(np.asarray(crcs[level], dtype="<u8").tobytes())
        h.update(np.asarray(present[level], dtype=np.uint8).tobytes())
    return h.hexdigest()


def check_ref_in(spec: BankSpec, ref) -> NodeRef:
    return spec.check_ref(NodeRef(int(ref[0]), int(ref[1])))
