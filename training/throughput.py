"""Training throughput as a share of what this machine's matmuls can do; every build reports it.

The FLOPs are an estimate from exact counts: torch's `FlopCounterMode` (every matmul and attention product,
forward and backward) counts one training step in `every`, and the counts are scaled to all steps by their
padded tokens (what the anchor's matmuls see; a step's preservation or distillation rows, when on, are
scaled with them although they do not grow with the batch). The counter puts a Python dispatch on every op,
which makes a counted step about half again as long (docs/training.md, "The demo bank"), so only one step
in 64 is counted. The yardstick is the best FLOP/s of a large matmul in the compute dtype on the training's
threads (`lm.dtype.matmul_flops`), measured before and after training: on a shared host the load moves it,
and the best of the two is the closer to what the machine can do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

log = logging.getLogger(__name__)


class Throughput:
    """FLOPs of a job's training steps (counted on a sample) against the machine's matmul FLOP/s."""

    def __init__(self, dtype: torch.dtype, every: int = 64) -> None:
        from lm.dtype import matmul_flops

        self.dtype, self.every = dtype, max(1, every)
        self.counted_flops = 0  # exact FLOPs of the counted steps
        self.counted_tokens = 0  # their padded tokens
        self.tokens = 0  # padded tokens of every step
        self.matmul_flops_per_s = matmul_flops(dtype)

    @contextmanager
    def step(self, index: int) -> Iterator[None]:
        """The context of training step `index`: counted when `index` is a multiple of `every`."""
        if index % self.every:
            yield
            return
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        before = self.tokens
        with counter:
            yield
        self.counted_flops += counter.get_total_flops()
        self.counted_tokens += self.tokens - before

    def add_tokens(self, padded: int) -> None:
        self.tokens += padded

    def state_dict(self) -> dict:
        return {"counted_flops": self.counted_flops, "counted_tokens": self.counted_tokens, "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.counted_flops = int(state.get("counted_flops", 0))
        self.counted_tokens = int(state.get("counted_tokens", 0))
        self.tokens = int(state.get("tokens", 0))

    def flops(self) -> float:
        """FLOPs of every step so far: the counted steps' FLOPs per padded token times all padded tokens."""
        return self.counted_flops * self.tokens / self.counted_tokens if self.counted_tokens else 0.0

    def ratio(self, train_seconds: float) -> float:
        """Achieved FLOP/s over the matmul yardstick (for the progress display)."""
        return self.flops() / max(train_seconds, 1e-9) / max(self.matmul_flops_per_s, 1e-9)

    def summary(self, train_seconds: float, dist: Any = None) -> dict:
        """The job.json fields: FLOPs, achieved FLOP/s, the matmul yardstick and their ratio. Under torchrun
        (`dist.world` > 1) every process must call it: the counts and the processes' yardsticks (each on its
        own threads) are summed, so the figures are the whole job's against the whole machine's."""
        from lm.dtype import matmul_flops

        self.matmul_flops_per_s = max(self.matmul_flops_per_s, matmul_flops(self.dtype))
        if dist is not None and dist.world > 1:
            import torch.distributed as tdist

            total = torch.tensor([self.counted_flops, self.counted_tokens, self.tokens, self.matmul_flops_per_s],
                                 dtype=torch.float64)
            tdist.all_reduce(total)
            self.counted_flops, self.counted_tokens, self.tokens = (int(v) for v in total[:3].tolist())
            self.matmul_flops_per_s = float(total[3])
        flops = self.flops()
        achieved = flops / train_seconds if train_seconds > 0 else 0.0
        ratio = achieved / self.matmul_flops_per_s if self.matmul_flops_per_s else 0.0
        dtype = str(self.dtype).removeprefix("torch.")
        out = {"train_flops": flops, "achieved_flops_per_s": achieved,
               "matmul_flops_per_s": self.matmul_flops_per_s,
               "flops_ratio": ratio, "compute_dtype": dtype,
               "flops_counted_every": self.every}
        log.info("training throughput: %.3g FLOP in %.0f s = %.1f GFLOP/s, %.0f%% of this machine's %s matmul "
                 "(%.1f GFLOP/s)", flops, train_seconds, achieved / 1e9, 100 * ratio, dtype,
                 self.matmul_flops_per_s / 1e9)
        return out
