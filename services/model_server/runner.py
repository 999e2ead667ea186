"""The `lm` anchor as the engine drives it: KV-cache slots, chunked prefill, batched decode, text codec."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)


class HFCodec:
    """Text <-> ids through the anchor's tokenizer; chat through its chat template."""

    def __init__(self, tokenizer: Any, vocab_size: int, bos_token_id: int | None = None) -> None:
        self.tok = tokenizer
        self.vocab_size = vocab_size
        self.bos = bos_token_id

    def encode(self, text: str) -> list[int]:
        ids = list(self.tok.encode(text, add_special_tokens=False))
        if not ids and self.bos is not None:
            ids = [self.bos]  # an empty prompt still needs one position to predict from
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        if getattr(self.tok, "chat_template", None):
            out = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = out["input_ids"] if hasattr(out, "keys") else out
            return [int(i) for i in ids]
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.encode(text)


class LmRunner:
    """Maps the engine's slots onto an `lm.KVCache` and runs prefill chunks and decode steps."""

    def __init__(self, anchor: Any, n_slots: int, max_seq_len: int, memory_layers: Sequence[int] | None = None,
                 codec: HFCodec | None = None, memory_impl: str = "slots") -> None:
        from lm import KVCache

        self.model = anchor.model
        self.config = anchor.config
        self.n_slots = n_slots
        self.max_seq_len = min(int(max_seq_len), int(anchor.config.max_seq_len))
        self.cache = KVCache(anchor.config, n_slots, self.max_seq_len, dtype=self.model.dtype)
        self.memory_layers = list(memory_layers if memory_layers is not None else range(anchor.config.n_layers))
        self.eos_token_ids = set(int(i) for i in (anchor.config.eos_token_ids or []))
        self.codec = codec
        self.memory_impl = memory_impl
        self._pools: Any = None
        self._slot_of: dict[int, int] = {}  # engine slot -> cache slot

    @property
    def rebuild_copies(self) -> bool:
        """Whether `build_memory` copies every block (then the engine keeps finished rows until a join)."""
        return self.memory_impl == "grouped"

    def build_memory(self, blocks: Sequence[torch.Tensor], row_blocks: Sequence[Sequence[int]]) -> Any:
        """The decode batch's memory (one per batch composition)."""
        if self.memory_impl == "slots":
            if self._pools is None:
                from .slot_memory import SlotPools

                self._pools = SlotPools(self.memory_layers, dtype=self.model.dtype)
            return self._pools.build(blocks, row_blocks)
        return self.build_row_memory(blocks, row_blocks)

    def build_row_memory(self, blocks: Sequence[torch.Tensor], row_blocks: Sequence[Sequence[int]]) -> Any:
        """Memory of a prefill, outside the decode batch's slots (stateless)."""
        if self.memory_impl in ("nodes", "slots"):
            from .node_memory import NodeMemory

            return NodeMemory(blocks, row_blocks, self.memory_layers, dtype=self.model.dtype)
        from lm import MemoryBatch

        return MemoryBatch.build(blocks, row_blocks, self.memory_layers, dtype=self.model.dtype)

    @torch.no_grad()
    def prefill(self, slot: int, ids: Sequence[int], start: int, memory: Any) -> torch.Tensor:
        if start == 0:
            if slot in self._slot_of:
                self.release(slot)
            self._slot_of[slot] = self.cache.allocate()
        x = torch.tensor([list(ids)], dtype=torch.long)  # (1, T)
        logits = self.model(x, cache=self.cache, slots=[self._slot_of[slot]], memory=memory, last_only=True)
        return logits[0, -1].float()  # (V,)

    @torch.no_grad()
    def decode(self, slots: Sequence[int], tokens: Sequence[int], memory: Any) -> torch.Tensor:
        x = torch.tensor(list(tokens), dtype=torch.long)[:, None]  # (B, 1)
        logits = self.model(x, cache=self.cache, slots=[self._slot_of[s] for s in slots], memory=memory)
        return logits[:, -1].float()  # (B, V)

    def release(self, slot: int) -> None:
        cache_slot = self._slot_of.pop(slot, None)
        if cache_slot is not None:
            self.cache.free(cache_slot)

    def decode_text(self, ids: Sequence[int]) -> str:
        assert self.codec is not None
        return self.codec.decode(list(ids))


def load_codec_and_runner(anchor_name: str, *, n_slots: int, max_seq_len: int,
                          memory_layers: Sequence[int] | None = None, memory_impl: str = "slots"
                          ) -> tuple[Any, HFCodec, LmRunner]:
    """Load the anchor (`lm.load_anchor`) and wrap it for the engine."""
    from lm import load_anchor

    anchor = load_anchor(anchor_name, dtype=torch.float32)
    codec = HFCodec(anchor.tokenizer, int(anchor.config.vocab_size), anchor.config.bos_token_id)
    runner = LmRunner(anchor, n_slots, max_seq_len, memory_layers, codec, memory_impl)
    return anchor, codec, runner
