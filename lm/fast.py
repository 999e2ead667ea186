"""How the anchor is run for serving: the compute dtype chosen by measuring this machine, and the model's
`nn.Linear`s swapped for weight-prepacked ones.

`lm/model.py` stays one readable model for training and serving; this module changes how it runs, the way
torch.ao's module swaps do: `prepare_for_inference(model)` casts it to the compute dtype `lm.dtype.fast_dtype`
picks (bfloat16 where this CPU's matmul units make it clearly faster, e.g. AMX; float32 where they do not),
then replaces every `nn.Linear` (the fused QKV and gate-up projections, O, down, the LM head) by a
`PackedLinear` whose weight is reordered once into oneDNN's blocked layout. A decode step is a handful of
small-M matmuls over every weight of the model, so it is bound by how fast the weights stream through the
cores: the prepacked kernels avoid the per-call reorder and the slow generic path PyTorch's `F.linear`
takes for small M (measured on this project's CI machine: a bf16 576x3072 projection at M=8 0.62 ms plain,
0.42 ms prepacked; the bf16 LM head at M=8 11.8 ms plain, 5.6 ms prepacked). The same ops are what
torch.compile's inductor emits for a frozen CPU graph; calling them directly keeps start-up instant and the
model eager (no recompiles when the batch size or the sequence length changes).

Where oneDNN is not available (or refuses the dtype), the `nn.Linear`s stay as they are.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lm.dtype import fast_dtype

log = logging.getLogger(__name__)


class PackedLinear(nn.Module):
    """`y = x @ W.T` (no bias) with W prepacked for oneDNN; the same function as the `nn.Linear` it replaces.

    The original weight is not kept: a prepared model is for inference only (no state_dict round trip)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, batch_hint: int) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("PackedLinear takes bias-free linears only (Llama has none)")
        self.in_features: int = linear.in_features
        self.out_features: int = linear.out_features
        weight = linear.weight.detach().to(dtype).contiguous()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed, None, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, prepacked"


def _packing_works(dtype: torch.dtype) -> bool:
    """Whether oneDNN can prepack and run a linear in `dtype` here, and gives nn.Linear's answer."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        lin = nn.Linear(64, 32, bias=False).to(dtype)
        x = torch.randn(3, 64, dtype=dtype)
        got = PackedLinear(lin, dtype, 1)(x)
        want = F.linear(x, lin.weight)
        return bool(torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2))
    except (RuntimeError, AttributeError) as exc:  # an op missing from this build, or a dtype it refuses
        log.info("oneDNN prepacking unavailable for %s: %s", dtype, exc)
        return False


def prepare_for_inference(model: nn.Module, dtype: str | torch.dtype = "auto", *, pack: bool = True,
                          batch_hint: int = 8) -> dict[str, Any]:
    """Cast `model` to the compute dtype and swap its `nn.Linear`s for `PackedLinear`s, in place.

    Args:
        dtype: "auto" (measured: `lm.dtype.fast_dtype`), "float32", "bfloat16" or a torch dtype.
        pack: False keeps plain `nn.Linear`s (for comparisons).
        batch_hint: the rows per call the packing is tuned for (decode batches; any M works).

    Returns what was chosen and measured (logged; the model server reports it): {"dtype", "packed",
    "measurement"}.
    """
    if isinstance(dtype, torch.dtype):
        chosen, measurement = dtype, {"choice": str(dtype).removeprefix("torch."), "reason": "asked for"}
    else:
        chosen, measurement = fast_dtype(dtype)
    model.to(dtype=chosen).eval().requires_grad_(False)
    packed = 0
    if pack and _packing_works(chosen):
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, PackedLinear(child, chosen, batch_hint))
                    packed += 1
    info = {"dtype": str(chosen).removeprefix("torch."), "packed_linears": packed, "measurement": measurement}
    log.info("anchor prepared for inference: %s, %d linears prepacked (%s)", info["dtype"], packed,
             measurement.get("reason", ""))
    return info


__all__ = ["PackedLinear", "prepare_for_inference"]
