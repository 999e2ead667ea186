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
        """`dtype` is the weight's and the computation's; inputs of another dtype are cast to it."""
        super().__init__()
        if linear.bias is not None:
            raise ValueError("PackedLinear takes bias-free linears only (Llama has none)")
        self.in_features: int = linear.in_features
        self.out_features: int = linear.out_features
        self.dtype: torch.dtype = dtype
        weight = linear.weight.detach().to(dtype).contiguous()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.dtype)
        y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, None, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, prepacked"


class RescoredHead(nn.Module):
    """The LM head in bfloat16 (prepacked), with each row's `k` best logits recomputed in float32.

    bfloat16 logits carry 8 bits of mantissa: at a logit of 20 they move in steps of 1/8, so two tokens a
    hair apart tie or swap, and greedy decoding flips (measured on SmolLM2: 98.0% of greedy tokens agree
    with float32 with a bfloat16 head, 99.1% with a float32 one, bench/fidelity.py). A float32 head reads
    twice the bytes of the largest matrix every step (+20-25% step time here); recomputing only the top-k
    candidates from the float32 hidden state and float32 rows costs k dot products per row and keeps
    float32's argmax (the float32 winner is among bfloat16's top few). Logits outside the top k keep
    bfloat16 precision, which sampling at temperature > 0 does not notice."""

    def __init__(self, linear: nn.Linear, batch_hint: int, k: int = 8) -> None:
        super().__init__()
        self.k = k
        self.head = PackedLinear(linear, torch.bfloat16, batch_hint)
        self.weight32: torch.Tensor
        self.register_buffer("weight32", linear.weight.detach().float().clone(), persistent=False)  # (V, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.head.in_features).float()  # (N, d): the final norm's float32 output
        logits = self.head(flat).float()  # (N, V)
        top = logits.topk(self.k, dim=-1).indices  # (N, k)
        exact = torch.einsum("nd,nkd->nk", flat, self.weight32[top])  # (N, k) in float32
        return logits.scatter_(-1, top, exact).view(*x.shape[:-1], self.head.out_features)


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
                          batch_hint: int = 8, rescore_head: bool = True) -> dict[str, Any]:
    """Cast `model` to the compute dtype and swap its `nn.Linear`s for `PackedLinear`s, in place.

    Args:
        dtype: "auto" (measured: `lm.dtype.fast_dtype`), "float32", "bfloat16" or a torch dtype.
        pack: False keeps plain `nn.Linear`s (for comparisons).
        batch_hint: the rows per call the packing is tuned for (decode batches; any M works).
        rescore_head: with bfloat16, make the LM head a `RescoredHead` (float32 top-k logits).

    With bfloat16 weights the residual stream and the final norm stay float32 (`Transformer.residual_dtype`),
    so 30 layers of additions do not round to 8 bits each and the head sees a float32 hidden state.

    Returns what was chosen and measured (logged): {"dtype", "packed_linears", "measurement",
    "residual_dtype", "lm_head"}.
    """
    if isinstance(dtype, torch.dtype):
        chosen, measurement = dtype, {"choice": str(dtype).removeprefix("torch."), "reason": "asked for"}
    else:
        chosen, measurement = fast_dtype(dtype)
    wide = chosen != torch.float32
    can_pack = pack and _packing_works(chosen)
    head = getattr(model, "lm_head", None)
    rescored = None
    if wide and rescore_head and can_pack and isinstance(head, nn.Linear):  # float32 rows before the cast
        rescored = RescoredHead(head, batch_hint)
    model.to(dtype=chosen).eval().requires_grad_(False)
    if wide and hasattr(model, "residual_dtype"):
        setattr(model, "residual_dtype", torch.float32)  # noqa: B010 - any model with the attribute
        final_norm = getattr(getattr(model, "model", None), "norm", None)
        if final_norm is not None and rescored is not None:
            final_norm.float()  # its output, the head's input, in float32
    packed = 0
    if can_pack:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not nn.Linear:
                    continue
                if child is head and rescored is not None:
                    setattr(parent, name, rescored)
                else:
                    setattr(parent, name, PackedLinear(child, chosen, batch_hint))
                packed += 1
    info = {"dtype": str(chosen).removeprefix("torch."), "packed_linears": packed, "measurement": measurement,
            "residual_dtype": "float32" if wide else str(chosen).removeprefix("torch."),
            "lm_head": "bfloat16, top-8 rescored in float32" if rescored is not None
            else str(chosen).removeprefix("torch.")}
    log.info("anchor prepared for inference: %s, %d linears prepacked (%s)", info["dtype"], packed,
             measurement.get("reason", ""))
    return info


__all__ = ["PackedLinear", "RescoredHead", "prepare_for_inference"]
