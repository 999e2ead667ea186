"""Fakes of the anchor, the bank and the bank client, small enough to reason about in a test.

FakeRunner: next token = 'a' + (last + 1 + shift) % 26, where `shift` is the sum of the first element of
each memory block the row uses, so a row's output tells which memory it was given.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch

from memory_store import Tree
from services.memory_bank.result import FetchResult

VOCAB = 128
EOS = 0


class FakeCodec:
    vocab_size = VOCAB
    max_token_chars = 1  # one token per character: the server's size check before tokenizing

    def encode(self, text: str) -> list[int]:
        return [min(ord(ch), VOCAB - 1) or 1 for ch in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids if i != EOS)

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.encode(text)


class FakeRunner:
    def __init__(self, n_slots: int = 4, max_seq_len: int = 512, step_delay: float = 0.0) -> None:
        self.n_slots = n_slots
        self.max_seq_len = max_seq_len
        self.eos_token_ids = {EOS}
        self.compute_dtype = torch.float32
        self.step_delay = step_delay
        self.lengths: dict[int, int] = {}
        self.decode_batches: list[int] = []
        self.prefill_calls: list[tuple[int, int]] = []  # (slot, chunk length) per row
        self.prefill_forwards: list[int] = []  # rows of each prefill forward
        self.blocks: dict = {}  # what set_blocks holds
        self.synced: list[set] = []  # the keys of every set_blocks call
        self.decoded_rows: list[list[tuple]] = []  # each decode step's rows (their block keys)
        self.eos_after: int | None = None  # emit EOS after this many tokens of a row

    def set_blocks(self, blocks) -> None:
        self.blocks = dict(blocks)
        self.synced.append(set(blocks))

    def _shift(self, keys) -> int:
        return int(sum(float(self.blocks[k].reshape(-1)[0]) for k in keys))

    def _logits(self, last: int, shift: int, n_generated: int) -> torch.Tensor:
        out = torch.zeros(VOCAB)
        if self.eos_after is not None and n_generated >= self.eos_after:
            out[EOS] = 10.0
            return out
        out[ord("a") + (last + 1 + shift) % 26] = 10.0
        return out

    def prefill(self, slots: Sequence[int], chunks, starts: Sequence[int], rows) -> torch.Tensor:
        self.prefill_forwards.append(len(slots))
        return torch.stack([self.prefill_one(*args) for args in zip(slots, chunks, starts, rows, strict=True)])

    def prefill_one(self, slot: int, ids: Sequence[int], start: int, keys) -> torch.Tensor:
        """One row of a prefill forward (subclasses record or fail here)."""
        assert self.lengths.get(slot, 0) == start, "prefill chunks must follow each other"
        self.prefill_calls.append((slot, len(ids)))
        self.lengths[slot] = start + len(ids)
        shift = self._shift(keys)
        self._gen = getattr(self, "_gen", {})
        self._gen[slot] = 0
        return self._logits(ids[-1], shift, 0)

    def decode(self, slots: Sequence[int], tokens: Sequence[int], rows) -> torch.Tensor:
        if self.step_delay:
            threading.Event().wait(self.step_delay)
        self.decode_batches.append(len(slots))
        self.decoded_rows.append([tuple(r) for r in rows])
        out = []
        for i, (slot, tok) in enumerate(zip(slots, tokens, strict=True)):
            assert slot in self.lengths, "decode of a slot that was never prefilled"
            self.lengths[slot] += 1
            self._gen[slot] += 1
            out.append(self._logits(tok, self._shift(rows[i]), self._gen[slot]))
        return torch.stack(out)

    def release(self, slot: int) -> None:
        self.lengths.pop(slot, None)

    def decode_text(self, ids: Sequence[int]) -> str:
        return FakeCodec().decode(list(ids))


def block_value(ref) -> float:
    return float(ref.level)  # each level shifts the output by its number: path of 2 levels -> shift 3


class FakeBank:
    """Tree 4 x 2 (level 1: 4 nodes, level 2: 8), dim 4; shard = level-1 subtree parity; no directory (so no
    document router), nothing deleted. What the model server reads of a bank: resolver.BankView."""

    bank_id = "fake-bank"
    dir = None

    def __init__(self, generic: bool = True) -> None:
        eye = np.eye(4, dtype=np.float32)
        l2 = np.repeat(eye, 2, axis=0) + np.tile(np.array([[0.1, 0, 0, 0], [0, 0.1, 0, 0]], np.float32), (4, 1))
        self.tree = Tree(centroids=[eye, l2 / np.linalg.norm(l2, axis=1, keepdims=True)],
                         parents=[np.zeros(4, dtype=np.int64), np.arange(8) // 2])
        self.anchor = {"arch": "fake", "hash": "0"}
        self._generic = generic

    def present_prefix(self, path) -> list[int]:
        return [int(i) for i in path]

    def is_present(self, ref) -> bool:
        return True

    def shard_of(self, ref) -> str:
        top = ref.index if ref.level == 1 else ref.index // 2
        return f"s{top % 2}"

    def generic_block(self):
        return torch.full((1, 3, 2, 4), 5.0) if self._generic else None


def fake_embed(texts: list[str]) -> np.ndarray:
    """Text containing 'topicN' embeds next to level-1 centroid N (else topic 0)."""
    out = np.zeros((len(texts), 4), dtype=np.float32)
    for i, t in enumerate(texts):
        n = next((int(t[j + 5]) for j in range(len(t) - 5) if t[j:j + 5] == "topic" and t[j + 5].isdigit()), 0)
        out[i, n % 4] = 1.0
    return out


class FakeFetcher:
    """Serves every block except those of shards in `down`; records what was asked."""

    def __init__(self, delay: float = 0.0) -> None:
        self.down: set[str] = set()
        self.calls: list[list] = []
        self.delay = delay
        self.bank = FakeBank()
        self._lock = threading.Lock()

    def fetch(self, refs):
        with self._lock:
            self.calls.append(list(refs))
        if self.delay:
            threading.Event().wait(self.delay)
        result = FetchResult()
        for ref in refs:
            if self.bank.shard_of(ref) in self.down:
                result.failed[ref] = f"shard {self.bank.shard_of(ref)} unreachable"
            else:
                result.blocks[ref] = torch.full((1, 3, 2, 4), block_value(ref), dtype=torch.float16)
        return result

    @property
    def fetched(self) -> list:
        return [r for call in self.calls for r in call]
