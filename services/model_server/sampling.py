"""Per-row next-token choice: lm's sampling (greedy, temperature / top-k / top-p) with the server's extras."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lm.generate import SamplingParams, sample_next


@dataclass
class Sampling(SamplingParams):
    """How one request picks tokens and when it stops: `lm.SamplingParams` plus `ignore_eos`, with the
    server's default of 16 new tokens."""

    max_new_tokens: int = 16
    ignore_eos: bool = False

    def generator(self) -> torch.Generator | None:
        """One generator per request (seeded, or from fresh entropy), so a row's draws never depend on the
        other rows of the batch; None for greedy."""
        if self.temperature <= 0:
            return None
        gen = torch.Generator()
        gen.manual_seed(self.seed if self.seed is not None else int(torch.seed() % (2**63)))
        return gen


def sample(logits: torch.Tensor, params: Sampling, gen: torch.Generator | None) -> int:
    """Next token id from one row of logits [V] (lm.sample_next on a batch of one)."""
    return int(sample_next(logits[None, :], [params], [gen])[0])
