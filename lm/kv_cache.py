"""A preallocated KV cache with slots, for continuous batching.

A slot holds one sequence. Sequences join by taking a free slot (`allocate`) and prefilling it
(`model(ids, cache=cache, slots=[s])`), decode together in one step over any set of active slots, each at its
own length (`model(next_ids[B, 1], cache=cache, slots=[s0, s1, ...])`), and leave with `free(s)`.

Semantics of one forward with the cache (row b, slot s = slots[b], T new tokens, L = length(s)):

    cache.kv[layer, s, L:L+T] = kv_new[b]           # keys and values of the T tokens (T, 2*nkv, hd)
    row b's queries attend to keys 0 .. their own position (positions beyond L+T are masked)
    length(s) = L + T                                # after the forward

Inference only: the cache is written in place, so run it under `torch.no_grad()`.
"""

from __future__ import annotations

import torch

from lm.config import ModelConfig
from lm.errors import CacheFull


class KVCache:
    """Keys and values of up to `max_batch` sequences of up to `max_seq_len` tokens.

    Fields:
        kv: (n_layers, max_batch, max_seq_len, 2 * n_kv_heads, head_dim): per layer and slot, each token's
            K heads then V heads, together, so one write stores both and a token's entry is contiguous.
        lengths: (max_batch,) int64 on CPU, tokens stored per slot (0 for a free slot).

    Memory: `nbytes` are reserved at construction as an anonymous mapping (see `_lazy_zeros`), so the resident
    size grows with the tokens actually stored (a page per ~5 tokens of a slot and layer), up to `nbytes`.
    """

    def __init__(self, config: ModelConfig, max_batch: int, max_seq_len: int | None = None, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.max_batch = max_batch
        self.max_seq_len = int(max_seq_len or config.max_seq_len)
        shape = (config.n_layers, max_batch, self.max_seq_len, 2 * config.n_kv_heads, config.head_dim)
        self.kv = _lazy_zeros(shape, dtype, torch.device(device))
        self.lengths = torch.zeros(max_batch, dtype=torch.long)
        self._free = list(range(max_batch - 1, -1, -1))  # pop() hands out the lowest slot first

    # ---- slot management ----------------------------------------------------------------------------

    def allocate(self) -> int:
        """Take a free slot (its length is 0). Raises `CacheFull` when all slots are busy."""
        if not self._free:
            raise CacheFull(f"all {self.max_batch} KV-cache slots are in use")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        """Release a slot; its contents become garbage and are overwritten by the next user."""
        if slot in self._free or not 0 <= slot < self.max_batch:
            raise ValueError(f"slot {slot} is not in use")
        self.lengths[slot] = 0
        self._free.append(slot)
        self._free.sort(reverse=True)

    @property
    def active_slots(self) -> list[int]:
        free = set(self._free)
        return [s for s in range(self.max_batch) if s not in free]

    @property
    def n_free(self) -> int:
        return len(self._free)

    def length(self, slot: int) -> int:
        return int(self.lengths[slot])

    def lengths_of(self, slots: torch.Tensor) -> torch.Tensor:
        free = set(self._free)
        bad = [int(s) for s in slots if int(s) in free]
        if bad:
            raise ValueError(f"slots {bad} are not allocated")
        return self.lengths[slots]

    # ---- used by the model's attention ---------------------------------------------------------------

    def update(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, kv_new: torch.Tensor
               ) -> torch.Tensor:
        """Write kv_new (B, T, 2*nkv, hd) at `positions` (B, T) of `slots` (B,) in `layer`; return the keys
        and values (B, S, 2*nkv, hd) of those slots for S = max position + 1 (a view when the slots are
        consecutive)."""
        kv_l = self.kv[layer]  # (max_batch, max_seq, 2*nkv, hd)
        kv_l[slots[:, None], positions] = kv_new.to(kv_l.dtype)  # (B, 1) broadcasts against positions (B, T)
        end = int(positions.max()) + 1
        n = slots.shape[0]
        first = int(slots[0])
        if n == 1 or bool((slots == torch.arange(first, first + n, device=slots.device)).all()):
            return kv_l[first:first + n, :end]
        return kv_l[slots, :end]

    @property
    def nbytes(self) -> int:
        """Bytes reserved for keys and values (the most it can hold resident)."""
        return self.kv.nbytes

    def advance(self, slots: torch.Tensor, n_tokens: int | torch.Tensor) -> None:
        """Lengths of `slots` += `n_tokens` (one count for all, or (B,) one per slot)."""
        self.lengths[slots] += n_tokens


def _lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros whose pages become resident only when written, on CPU: an anonymous mapping (zero pages from
    the OS; torch.zeros writes every byte up front) with transparent huge pages off, because with THP a
    write of one token would fault in the whole 2 MB around it, i.e. every slot's full length per layer.
    Elsewhere a plain torch.zeros."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    import math
    import mmap

    n_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    buf = mmap.mmap(-1, max(n_bytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    # the tensor keeps `buf` alive through the buffer protocol
    return torch.frombuffer(buf, dtype=torch.uint8, count=n_bytes).view(dtype).view(shape)
