"""hiermem.lm: the anchor transformer with FFN-memory slots, weight import, KV cache and generation.

The public names below are imported lazily (PEP 562), so `import lm.cli` — which `hiermem --help` does —
does not pay for importing torch; transformers is imported only when an anchor is loaded or converted.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "GenerationResult": "lm.generate", "SamplingParams": "lm.generate", "generate": "lm.generate",
    "sample_next": "lm.generate", "KVCache": "lm.kv_cache", "MemoryBatch": "lm.memory",
    "ModelConfig": "lm.model", "Transformer": "lm.model", "Anchor": "lm.weights", "load_anchor": "lm.weights",
}

__all__ = ["Anchor", "GenerationResult", "KVCache", "MemoryBatch", "ModelConfig", "SamplingParams",
           "Transformer", "generate", "load_anchor", "sample_next"]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from lm.generate import GenerationResult, SamplingParams, generate, sample_next
    from lm.kv_cache import KVCache
    from lm.memory import MemoryBatch
    from lm.model import ModelConfig, Transformer
    from lm.weights import Anchor, load_anchor


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
