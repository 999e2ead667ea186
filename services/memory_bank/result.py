"""What one fetch of blocks returns, from the bank client or from a bank's own files.

Its own module, free of grpc, so that a model server reading a bank's files directly (no bank service)
returns the same type without loading the client's transport.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from memory_store import NodeRef


@dataclass
class FetchResult:
    """What one fetch got: every requested node is in exactly one of `blocks` and `failed`."""

    blocks: dict[NodeRef, torch.Tensor] = field(default_factory=dict)  # [L_mem, 3, r_l, d], bank dtype
    failed: dict[NodeRef, str] = field(default_factory=dict)  # node -> why it could not be had
    nbytes: int = 0  # block bytes received
    failovers: int = 0  # replicas given up on during this fetch
    shard_seconds: dict[str, float] = field(default_factory=dict)  # wall time of each shard's calls
