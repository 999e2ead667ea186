"""Per-row next-token choice: greedy, or temperature / top-k / top-p with a per-request generator."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Sampling:
    """How one request picks tokens and when it stops."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def generator(self) -> torch.Generator | None:
        if self.temperature <= 0:
            return None
        gen = torch.Generator()
        gen.manual_seed(self.seed if self.seed is not None else int(torch.seed() % (2**63)))
        return gen


def sample(logits: torch.Tensor, params: Sampling, gen: torch.Generator | None) -> int:
    """Next token id from one row of logits [V]."""
    if params.temperature <= 0 or gen is None:
        return int(torch.argmax(logits).item())
    scores = logits.float() / params.temperature
    if params.top_k > 0:
        k = min(params.top_k, scores.numel())
        kth = torch.topk(scores, k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        cut = torch.cumsum(probs, dim=-1) - probs > params.top_p  # keep the smallest prefix reaching top_p
        sorted_scores = sorted_scores.masked_fill(cut, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen).item())
