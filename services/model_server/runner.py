"""The `lm` anchor as the engine drives it: KV-cache slots, chunked prefill, batched decode (its text codec:
codec.py)."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from .codec import HFCodec

if TYPE_CHECKING:  # pragma: no cover
    from lm import Anchor

    from .slot_memory import SlotMemory

log = logging.getLogger(__name__)


class LmRunner:
    """Maps the engine's slots onto an `lm.KVCache` and runs prefill chunks and decode steps, the anchor
    prepared for inference (`lm.fast`: compute dtype measured here, prepacked weights) and the memories in
    slot pools (`SlotPools`) of that dtype.

    Steps run under `torch.inference_mode()`, not `no_grad`: no version counters or view tracking on the
    ~100 small ops per layer, a measurable part of a batch-1 decode step (docs/model_server.md, "Inside").
    The KV cache and the slot pools are made outside it and written in place inside it, which inference mode
    allows; the logits it returns are only read (sampled) by the engine."""

    def __init__(self, anchor: Anchor, n_slots: int, max_seq_len: int,
                 memory_layers: Sequence[int] | None = None, codec: HFCodec | None = None, *,
                 dtype: str = "auto") -> None:
        from lm import KVCache
        from lm.fast import prepare_for_inference

        from .slot_memory import SlotPools

        self.model = anchor.model
        self.config = anchor.config
        self.compute = prepare_for_inference(self.model, dtype)  # {"dtype", "packed_linears", "measurement"}
        self.n_slots = n_slots
        self.max_seq_len = min(int(max_seq_len), int(anchor.config.max_seq_len))
        self.cache = KVCache(anchor.config, n_slots, self.max_seq_len, dtype=self.model.dtype)
        self._weight_bytes = sum(t.nbytes for t in [*self.model.parameters(), *self.model.buffers()])  # as prepared
        self.memory_layers = list(memory_layers if memory_layers is not None else range(anchor.config.n_layers))
        # with a bank (memory layers given) the memory products' orientation is measured now, at start-up, not
        # in the first memory request; without one the pools never compute, so nothing is measured
        self.pools = SlotPools(self.memory_layers, dtype=self.model.dtype,
                               d=anchor.config.d_model if memory_layers is not None else None)
        self.compute["memory_orientation"] = self.pools.orientation  # slot_memory.measure_orientation, or None
        self.eos_token_ids = set(int(i) for i in (anchor.config.eos_token_ids or []))
        self.codec = codec
        self._slot_of: dict[int, int] = {}  # engine slot -> cache slot
        self._decode_memory: tuple[tuple, SlotMemory | None] | None = None  # (rows + pools version, memory)

    @torch.inference_mode()
    def warm_up(self, batch_sizes: Sequence[int] = (1, 2, 4, 8, 16)) -> None:
        """One prefill and one decode step per batch size before serving: oneDNN builds its kernels for these
        shapes and the allocator reaches its working size now, not during the first requests (the first
        request is no slower than the rest, and RSS after start is what serving needs)."""
        sizes = sorted({min(b, self.n_slots) for b in batch_sizes})
        slots = [self.cache.allocate() for _ in range(max(sizes))]
        try:
            ids = torch.zeros(1, 16, dtype=torch.long)
            for s in slots:
                self.model(ids, cache=self.cache, slots=[s], last_only=True)
            for b in sizes:
                self.model(torch.zeros(b, 1, dtype=torch.long), cache=self.cache, slots=slots[:b])
        finally:
            for s in slots:
                self.cache.free(s)

    def set_blocks(self, blocks: Mapping[Hashable, torch.Tensor]) -> None:
        self.pools.sync(blocks)

    def _memory(self, rows: Sequence[Sequence[Hashable]], fuse: bool = False) -> SlotMemory | None:
        return self.pools.memory_for(rows, fuse) if any(rows) else None

    @torch.inference_mode()
    def prefill(self, slots: Sequence[int], chunks: Sequence[Sequence[int]], starts: Sequence[int],
                rows: Sequence[Sequence[Hashable]]) -> torch.Tensor:
        """One forward for the next prompt chunk of several rows, right-padded to the longest (`lengths=`):
        the weights stream once for all of them instead of once per prompt."""
        for slot, start in zip(slots, starts, strict=True):
            if start == 0:
                if slot in self._slot_of:
                    self.release(slot)
                self._slot_of[slot] = self.cache.allocate()
        width = max(len(c) for c in chunks)
        x = torch.zeros(len(chunks), width, dtype=torch.long)  # (B, T)
        for b, chunk in enumerate(chunks):
            x[b, :len(chunk)] = torch.tensor(list(chunk), dtype=torch.long)
        logits = self.model(x, cache=self.cache, slots=[self._slot_of[s] for s in slots],
                            memory=self._memory(rows), last_only=True,
                            lengths=torch.tensor([len(c) for c in chunks]))
        return logits[:, -1].float()  # (B, V)

    @torch.inference_mode()
    def decode(self, slots: Sequence[int], tokens: Sequence[int], rows: Sequence[Sequence[Hashable]]
               ) -> torch.Tensor:
        key = (self.pools.version, tuple(tuple(r) for r in rows))
        if self._decode_memory is None or self._decode_memory[0] != key:  # the batch or its slots changed
            self._decode_memory = (key, self._memory(rows, fuse=True))  # reused until the batch changes
        x = torch.tensor(list(tokens), dtype=torch.long)[:, None]  # (B, 1)
        logits = self.model(x, cache=self.cache, slots=[self._slot_of[s] for s in slots],
                            memory=self._decode_memory[1])
        return logits[:, -1].float()  # (B, V)

    def release(self, slot: int) -> None:
        cache_slot = self._slot_of.pop(slot, None)
        if cache_slot is not None:
            self.cache.free(cache_slot)

    def decode_text(self, ids: Sequence[int]) -> str:
        assert self.codec is not None
        return self.codec.decode(list(ids))

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def reserved_bytes(self) -> dict[str, int]:
        """Bytes the runner holds by part: weights (as prepared), KV cache (reserved), memory slot pools."""
        return {"weights": self._weight_bytes, "kv_cache": self.cache.nbytes, "memory_slots": self.pools.nbytes}


def load_codec_and_runner(anchor_name: str, *, n_slots: int, max_seq_len: int,
                          memory_layers: Sequence[int] | None = None, dtype: str = "auto"
                          ) -> tuple[Anchor, HFCodec, LmRunner]:
    """Load the anchor (`lm.load_anchor`) and wrap it for the engine."""
    from lm import load_anchor

    anchor = load_anchor(anchor_name, dtype=torch.float32)
    codec = HFCodec(anchor.tokenizer, int(anchor.config.vocab_size), anchor.config.bos_token_id)
    runner = LmRunner(anchor, n_slots, max_seq_len, memory_layers, codec, dtype=dtype)
    runner.warm_up()
    return anchor, codec, runner
