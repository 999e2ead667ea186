"""How training forwards run on this machine: bfloat16 autocast where a short measurement at start-up shows
bfloat16 matmuls clearly faster (lm/dtype.py), and on CPU the math attention kernel."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch


class Compute:
    """The compute dtype of one job's model (`choice`: "auto", "float32" or "bfloat16"; "auto" measures)."""

    def __init__(self, model, choice: str = "auto") -> None:
        from lm.dtype import fast_dtype

        self.model = model
        self.dtype, self.measurement = fast_dtype(choice)

    @property
    def bf16_autocast(self) -> bool:
        return self.dtype == torch.bfloat16 and self.model.device.type == "cpu"

    @contextmanager
    def autocast(self) -> Iterator[None]:
        """The context of every training forward: bfloat16 autocast (where chosen) and the math attention
        kernel -- on CPU, the flash kernel's backward took a fifth of a step on these short documents."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16_autocast), \
                (sdpa_kernel([SDPBackend.MATH]) if self.model.device.type == "cpu" else nullcontext()):
            yield

    def store_frozen_weights(self, first_layer: int) -> dict[torch.nn.Module, torch.Tensor]:
        """Under bfloat16 autocast, store the frozen anchor's linear weights from `first_layer` up in bfloat16
        once, instead of autocast casting every one of them at every forward and backward (its cast cache
        holds only weights that require grad). The results are the same: autocast would have run these
        matmuls on the same bfloat16 values. Returns the float32 originals for `restore_weights`. Only layers
        >= the first memory layer run in training steps; layers below stay float32 for the prefix cache."""
        if not self.bf16_autocast:
            return {}
        saved: dict[torch.nn.Module, torch.Tensor] = {}
        for layer in self.model.model.layers[first_layer:]:
            for mod in layer.modules():
                if isinstance(mod, torch.nn.Linear) and mod.weight.dtype == torch.float32:
                    saved[mod] = mod.weight.data
                    mod.weight.data = mod.weight.data.to(torch.bfloat16)
        return saved

    @staticmethod
    def restore_weights(saved: dict[torch.nn.Module, torch.Tensor]) -> None:
        for mod, w in saved.items():
            mod.weight.data = w
