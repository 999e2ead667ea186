"""Named errors of the lm package (transports map them to status codes in one place)."""

from __future__ import annotations


class LMError(Exception):
    """Base of the lm package's errors."""


class CacheFull(LMError):
    """No free KV-cache slot: the caller should queue the request or answer 503."""


class AnchorNotFound(LMError):
    """`load_anchor` got a name or directory it cannot resolve to weights."""


class UnsupportedCheckpoint(LMError):
    """A checkpoint whose architecture or tensors do not fit `Transformer` (key or shape mismatch)."""


class MemoryShapeError(LMError):
    """Memory blocks whose shape does not fit the anchor (d_model, number of memory layers)."""
