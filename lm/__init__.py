"""hiermem.lm: the anchor transformer with FFN-memory slots, weight import, KV cache and generation.

transformers is imported only when an anchor is loaded or converted.
"""

from __future__ import annotations

from lm.generate import GenerationResult, SamplingParams, generate, sample_next
from lm.kv_cache import KVCache
from lm.memory_batch import MemoryBatch
from lm.model import ModelConfig, Transformer
from lm.weights import Anchor, load_anchor

__all__ = ["Anchor", "GenerationResult", "KVCache", "MemoryBatch", "ModelConfig", "SamplingParams",
           "Transformer", "generate", "load_anchor", "sample_next"]
