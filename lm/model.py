"""The anchor: a Llama-family decoder whose SwiGLU FFNs accept hierarchical FFN-memories.

One readable file in the manner of nanoGPT's model.py. Parameter names are the Hugging Face Llama checkpoint
keys (``model.layers.3.mlp.down_proj.weight`` ...) except two fused projections, as vLLM fuses them:
``self_attn.qkv_proj`` (q, k, v stacked by rows) and ``mlp.gate_up_proj`` (gate, up). Importing a checkpoint
is a key-by-key copy with a shape check on each tensor after stacking those (``lm.weights.hf_to_fused``);
saving splits them back, so the files stay HF-loadable.

How fast it runs is a property of how it is run, not of this file: ``lm.fast.prepare_for_inference`` picks
the compute dtype and swaps the `nn.Linear`s for weight-prepacked ones for serving.

FFN-memory (docs/design.md §1): for every block on a row's path, a memory layer adds

    y += M_down · [silu(M_gate · h) ⊙ (M_up · h)]

to the anchor FFN's output, with the same input h. Which blocks a row uses, and how rows that share a block
share its computation, is the business of ``lm.memory_batch.MemoryBatch``; this file only calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lm.config import ModelConfig

if TYPE_CHECKING:  # pragma: no cover
    from lm.kv_cache import KVCache


class FFNMemory(Protocol):
    """What the `memory=` argument must offer: `lm.memory_batch.MemoryBatch`, or any object with the same two
    members (the model server's `SlotMemory` keeps blocks in slots across batch compositions)."""

    @property
    def n_rows(self) -> int:
        """B, the batch size it was built for."""
        ...

    def ffn_delta(self, layer: int, h: torch.Tensor) -> torch.Tensor | None:
        """What the memories add to anchor layer `layer`'s FFN output for input h (B, T, d), or None."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized in float32 whatever x's dtype (the residual stream may be wider than the weights),
        returned in the weights' dtype, the dtype the next matmul runs in."""
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(self.weight.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype, *,
                 n_heads: int = 1, n_rotated: int | None = None):
    """cos, signed sin of shape (B, T, n_heads, hd) for integer positions (B, T), HF's rotate-half convention
    written with a roll (see `apply_rope`). Heads from `n_rotated` on get cos 1 and sin 0: `apply_rope` then
    returns them unchanged (the V heads of a fused QKV tensor ride along exactly)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    cos = freqs.cos().repeat(1, 1, 2)[:, :, None].repeat(1, 1, n_heads, 1)  # (B, T, H, hd)
    sin = freqs.sin()
    sin = torch.cat((-sin, sin), dim=-1)[:, :, None].repeat(1, 1, n_heads, 1)  # rotate_half's sign folded in
    if n_rotated is not None and n_rotated < n_heads:
        cos[:, :, n_rotated:], sin[:, :, n_rotated:] = 1.0, 0.0
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., hd) rotated: HF's x*cos + rotate_half(x)*sin, where rotate_half(x) = cat(-x2, x1) equals
    roll(x, hd/2) with the sign folded into `sin` (`rope_cos_sin`). Three ops for all heads at once."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


class Attention(nn.Module):
    """Grouped-query attention; Q, K and V come from one fused projection (HF's q/k/v_proj stacked by rows,
    see `lm.weights.hf_to_fused`), so a step reads the three weights in one matmul."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.qkv_split = [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]
        self.qkv_proj = nn.Linear(cfg.d_model, sum(self.qkv_split), bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, ctx: _StepContext) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv, hd = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim
        qkv = self.qkv_proj(x).view(B, T, nh + 2 * nkv, hd)
        qkv = apply_rope(qkv, cos, sin)  # rotates the Q and K heads; V heads have cos 1, sin 0 (unchanged)
        q, kv = qkv[:, :, :nh], qkv[:, :, nh:]  # (B, T, nh, hd), (B, T, 2*nkv, hd): K heads then V heads
        if ctx.kv is not None:
            cache, slots = ctx.kv
            kv = cache.update(self.layer_idx, slots, ctx.positions, kv)  # (B, S, 2*nkv, hd)
        q, kv = q.transpose(1, 2), kv.transpose(1, 2)  # (B, nh, T, hd), (B, 2*nkv, S, hd)
        k, v = kv[:, :nkv], kv[:, nkv:]
        gqa = nkv != nh
        dtype = q.dtype
        if ctx.decode_attn_dtype is not None and ctx.decode_attn_dtype != dtype:
            q, k, v = q.to(ctx.decode_attn_dtype), k.to(ctx.decode_attn_dtype), v.to(ctx.decode_attn_dtype)
        if ctx.attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.attn_mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, nh * hd).to(dtype)  # (B, T, nh*hd)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU FFN with gate and up fused into one projection (gate rows, then up rows); `memory` adds the
    row's FFN-memory units on the same input (docs/design.md §1)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.gate_up_proj = nn.Linear(cfg.d_model, 2 * cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, h: torch.Tensor, memory: FFNMemory | None = None) -> torch.Tensor:
        gate, up = self.gate_up_proj(h).chunk(2, dim=-1)
        y = self.down_proj(F.silu(gate) * up)
        if memory is not None:
            delta = memory.ffn_delta(self.layer_idx, h)  # (B, T, d) or None for a layer without memory
            if delta is not None:
                y = y + delta
        return y


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg, layer_idx)

    def forward(self, x, cos, sin, ctx: _StepContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x), ctx.memory)


class _Backbone(nn.Module):
    """Holds what HF Llama checkpoints put under the `model.` prefix."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)


@dataclass
class _StepContext:
    """What every layer of one forward pass shares."""

    positions: torch.Tensor  # (B, T) int64 absolute positions
    memory: FFNMemory | None = None
    kv: tuple[KVCache, torch.Tensor] | None = None  # the KV cache and the (B,) int64 cache slot of each row
    attn_mask: torch.Tensor | None = None  # (B, 1, T, S) bool, True = attend; None = plain causal
    decode_attn_dtype: torch.dtype | None = None  # one query per row: attention in this dtype (None: q's)


class Transformer(nn.Module):
    """Llama-family decoder LM with FFN-memory slots.

    Forward modes:
      * no cache: `input_ids` (B, T) are whole sequences starting at position 0 (or at `positions`);
      * with `cache` and `slots`: row b appends its T tokens to cache slot `slots[b]` after that slot's
        current length (see `lm.kv_cache.KVCache`); rows may be at different lengths.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = _Backbone(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # dtype of the residual stream: None = the weights' dtype. `lm.fast` sets float32 when the weights are
        # bfloat16, so 30 layers of additions do not round to 8 bits each time (the norms feed the matmuls
        # in the weights' dtype either way)
        self.residual_dtype: torch.dtype | None = None
        # dtype of decode attention (one new token per row against the cache): None = the weights' dtype.
        # `lm.fast` sets float32 where, with bfloat16 weights, that is measured faster (PyTorch's CPU kernel
        # for one bfloat16 query was 4-7x slower than casting to float32 on an AVX-512 EPYC)
        self.decode_attention_dtype: torch.dtype | None = None
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, seed: int = 0, std: float = 0.02) -> Transformer:
        """Deterministic random init (normal(0, std) matrices, unit norms), for tiny test anchors."""
        g = torch.Generator().manual_seed(seed)
        hf = fused_to_hf(self.state_dict(), self.config)  # drawn in HF layout and order, as before fusing
        new = {}
        for name, p in hf.items():
            if name == "lm_head.weight" and self.config.tie_embeddings:
                continue
            new[name] = torch.ones(p.shape) if name.endswith("norm.weight") else torch.randn(p.shape, generator=g) * std
        fused = hf_to_fused(new)
        with torch.no_grad():
            for name, p in self.state_dict(keep_vars=True).items():
                if name in fused:
                    p.copy_(fused[name])
        return self

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    # ---- building blocks shared by the forward modes ------------------------------------------------

    def _context(self, input_ids, positions, cache, slots, memory) -> _StepContext:
        B, T = input_ids.shape
        if cache is None:
            if slots is not None:
                raise ValueError("slots given without a cache")
            if positions is None:
                positions = torch.arange(T, device=input_ids.device).expand(B, T)
            return _StepContext(positions=positions, memory=memory)
        if slots is None:
            raise ValueError("a cache needs the slots of the rows")
        slots_t = torch.as_tensor(slots, dtype=torch.long).cpu()  # lengths live on the CPU
        if slots_t.shape != (B,):
            raise ValueError(f"slots must have one entry per row ({B}), got {tuple(slots_t.shape)}")
        start = cache.lengths_of(slots_t)  # (B,)
        if positions is None:
            positions = (start[:, None] + torch.arange(T)).to(input_ids.device)  # (B, T)
        end = int((start + T).max())
        if end > cache.max_seq_len:
            raise ValueError(f"sequence would reach {end} tokens, cache holds {cache.max_seq_len}")
        key_pos = torch.arange(end, device=input_ids.device)
        mask = key_pos[None, None, :] <= positions[:, :, None]  # (B, T, S): causal w.r.t. each row's length
        attn_mask = None if bool(mask.all()) else mask[:, None]  # (B, 1, T, S)
        return _StepContext(positions=positions, memory=memory, kv=(cache, slots_t.to(input_ids.device)),
                            attn_mask=attn_mask, decode_attn_dtype=self.decode_attention_dtype if T == 1 else None)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)  # (B, T, d)
        return x if self.residual_dtype is None else x.to(self.residual_dtype)

    def _run_layers(self, x, ctx: _StepContext, start: int = 0, stop: int | None = None) -> torch.Tensor:
        c = self.config
        cos, sin = rope_cos_sin(ctx.positions, c.head_dim, c.rope_theta, self.dtype,
                                n_heads=c.n_heads + 2 * c.n_kv_heads, n_rotated=c.n_heads + c.n_kv_heads)
        for layer in self.model.layers[start:stop]:
            x = layer(x, cos, sin, ctx)
        return x

    def _check_memory(self, memory: FFNMemory | None, batch: int) -> None:
        if memory is not None and memory.n_rows != batch:
            raise ValueError(f"memory built for {memory.n_rows} rows, batch has {batch}")

    # ---- public API --------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, slots=None, memory: FFNMemory | None = None,
                last_only: bool = False, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) for `input_ids` (B, T); (B, 1, V) when `last_only` (saves the LM head on prefill).

        Args:
            positions: (B, T) absolute positions; default continues each row from its cache length (or 0).
            cache, slots: KV cache and one slot per row; the cache is updated in place and each slot's length
                advances by T. Use under `torch.no_grad()`.
            memory: per-row FFN-memories (a `MemoryBatch` or another `FFNMemory`, built for these B rows).
            lengths: (B,) real tokens per row when rows of different lengths are right-padded to T (prefill
                of several prompts in one forward): `last_only` then gives each row's logits at its last real
                token, and a slot advances by its row's length, so the padding it was written is never
                attended (causal) and the next tokens overwrite it.
        """
        B, T = input_ids.shape
        self._check_memory(memory, B)
        if lengths is not None:
            lengths = torch.as_tensor(lengths, dtype=torch.long).cpu()
            if lengths.shape != (B,) or int(lengths.min()) < 1 or int(lengths.max()) > T:
                raise ValueError(f"lengths must be ({B},) values in [1, {T}], got {lengths.tolist()}")
        ctx = self._context(input_ids, positions, cache, slots, memory)
        x = self._run_layers(self._embed(input_ids), ctx)  # (B, T, d)
        if ctx.kv is not None:
            kv_cache, kv_slots = ctx.kv
            kv_cache.advance(kv_slots.cpu(), T if lengths is None else lengths)
        if last_only:
            x = x[:, -1:] if lengths is None else x[torch.arange(B), (lengths - 1).to(x.device)][:, None]
        return self.lm_head(self.model.norm(x))

    def hidden_at(self, input_ids: torch.Tensor, layer: int, *, positions: torch.Tensor | None = None,
                  memory: FFNMemory | None = None) -> torch.Tensor:
        """Residual stream (B, T, d) entering layer `layer` (0 = the embeddings). With a frozen anchor and no
        memory below `layer`, this can be cached once per document and fed to `forward_from`."""
        if not 0 <= layer <= self.config.n_layers:
            raise ValueError(f"layer must be in [0, {self.config.n_layers}], got {layer}")
        self._check_memory(memory, input_ids.shape[0])
        ctx = self._context(input_ids, positions, None, None, memory)
        return self._run_layers(self._embed(input_ids), ctx, 0, layer)

    def forward_from(self, hidden: torch.Tensor, start_layer: int, *, positions: torch.Tensor | None = None,
                     memory: FFNMemory | None = None, select: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) from the residual stream `hidden` (B, T, d) entering layer `start_layer`.
        `forward_from(hidden_at(ids, l), l, memory=m)` == `forward(ids, memory=m)` when m has no layer < l.

        Args:
            select: optional (B, T) bool; the LM head (the largest matmul, V = vocab) is then applied only
                where it is True and the result is (N, V), rows in row-major order (training: loss positions).
        """
        if not 0 <= start_layer <= self.config.n_layers:
            raise ValueError(f"start_layer must be in [0, {self.config.n_layers}], got {start_layer}")
        B, T, _ = hidden.shape
        self._check_memory(memory, B)
        ids = torch.zeros(B, T, dtype=torch.long, device=hidden.device)
        ctx = self._context(ids, positions, None, None, memory)
        x = self.model.norm(self._run_layers(hidden, ctx, start_layer, None))  # (B, T, d)
        if select is not None:
            x = x[select]  # (N, d)
        return self.lm_head(x)


# (our fused key suffix, the HF key suffixes stacked into it by rows, in order)
_FUSED = (("self_attn.qkv_proj.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                         "self_attn.v_proj.weight")),
          ("mlp.gate_up_proj.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight")))


def hf_to_fused(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF Llama keys -> ours: each layer's q/k/v and gate/up weights stacked by rows into qkv_proj and
    gate_up_proj (lm/model.py). Other keys pass through; a layer missing one part keeps its parts (the
    shape check of `_to_state_dict` then names what is missing)."""
    out = dict(tensors)
    for fused, parts in _FUSED:
        prefixes = {k[: -len(parts[0])] for k in tensors if k.endswith(parts[0])}
        for pre in prefixes:
            if all(pre + part in tensors for part in parts):
                out[pre + fused] = torch.cat([out.pop(pre + part) for part in parts])
    return out


def fused_to_hf(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of `hf_to_fused`: what a HF Llama checkpoint (and the anchor identity hash) names."""
    widths = {"self_attn.qkv_proj.weight": [config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim,
                                            config.n_kv_heads * config.head_dim],
              "mlp.gate_up_proj.weight": [config.ffn_dim, config.ffn_dim]}
    out = {}
    for key, t in tensors.items():
        for fused, parts in _FUSED:
            if key.endswith(fused):
                pre = key[: -len(fused)]
                out.update({pre + part: piece for part, piece in zip(parts, t.split(widths[fused]), strict=True)})
                break
        else:
            out[key] = t
    return out


def ffn_param_count(config: ModelConfig) -> int:
    """Parameters of all anchor FFNs (for 'memory size relative to the anchor' figures)."""
    return 3 * config.d_model * config.ffn_dim * config.n_layers


__all__ = ["FFNMemory", "ModelConfig", "RMSNorm", "Transformer", "apply_rope", "ffn_param_count", "fused_to_hf",
           "hf_to_fused", "rope_cos_sin"]
