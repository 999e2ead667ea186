"""The anchor: a Llama-family decoder whose SwiGLU FFNs accept hierarchical FFN-memories.

One readable file in the manner of nanoGPT's model.py. Parameter names are the Hugging Face Llama checkpoint
keys (``model.layers.3.mlp.gate_proj.weight`` ...), so importing a checkpoint is a key-by-key copy with a
shape check on each tensor (see ``lm/weights.py``).

FFN-memory (DESIGN.md §1): for every block on a row's path, a memory layer adds

    y += M_down · [silu(M_gate · h) ⊙ (M_up · h)]

to the anchor FFN's output, with the same input h. Which blocks a row uses, and how rows that share a block
share its computation, is the business of ``lm.memory.MemoryBatch``; this file only calls it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from lm.kv_cache import KVCache


class FFNMemory(Protocol):
    """What the `memory=` argument must offer: `lm.memory.MemoryBatch`, or any object with the same two
    members (the model server's slot and node memories keep blocks in place across batch compositions)."""

    @property
    def n_rows(self) -> int:
        """B, the batch size it was built for."""
        ...

    def ffn_delta(self, layer: int, h: torch.Tensor) -> torch.Tensor | None:
        """What the memories add to anchor layer `layer`'s FFN output for input h (B, T, d), or None."""
        ...


@dataclass
class ModelConfig:
    vocab_size: int = 49152
    d_model: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int = 64
    ffn_dim: int = 1536
    rope_theta: float = 100000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_seq_len: int = 8192
    bos_token_id: int | None = 1
    eos_token_ids: list[int] = field(default_factory=lambda: [2])

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for RoPE")

    @property
    def n_params(self) -> int:
        attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        per_layer = attn + 3 * self.d_model * self.ffn_dim + 2 * self.d_model
        emb = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + emb + self.d_model

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """From a Hugging Face LlamaConfig dict (config.json), transformers 4.x or 5.x spelling."""
        if hf.get("model_type", "llama") not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"unsupported architecture {hf.get('model_type')!r}: only Llama-family")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ValueError("attention/MLP biases are not supported")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"unsupported RoPE scaling {rope!r}")
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        n_heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
            n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, ffn_dim=hf["intermediate_size"],
            rope_theta=float(theta), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_seq_len=int(hf.get("max_position_embeddings", 8192)),
            bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids,
        )

    def to_hf(self) -> dict[str, Any]:
        """The equivalent Hugging Face LlamaConfig dict (what our cache writes as config.json)."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab_size,
            "hidden_size": self.d_model, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim, "intermediate_size": self.ffn_dim, "hidden_act": "silu",
            "rope_theta": self.rope_theta, "rms_norm_eps": self.norm_eps,
            "tie_word_embeddings": self.tie_embeddings, "max_position_embeddings": self.max_seq_len,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else self.eos_token_ids,
            "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        }


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (B, 1, T, hd) for integer positions (B, T); HF's rotate-half convention."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, ctx: _StepContext) -> torch.Tensor:
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(B, T, self.cfg.n_heads, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.cfg.n_kv_heads, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.cfg.n_kv_heads, hd).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if ctx.kv is not None:
            cache, slots = ctx.kv
            k, v = cache.update(self.layer_idx, slots, ctx.positions, k, v)  # (B, nkv, S, hd)
        gqa = self.cfg.n_kv_heads != self.cfg.n_heads
        if ctx.attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.attn_mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.cfg.n_heads * hd)  # (B, T, nh*hd)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU FFN; `memory` adds the row's FFN-memory units on the same input (DESIGN.md §1)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, h: torch.Tensor, memory: FFNMemory | None = None) -> torch.Tensor:
        y = self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
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
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, seed: int = 0, std: float = 0.02) -> Transformer:
        """Deterministic random init (normal(0, std) matrices, unit norms), for tiny test anchors."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
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
                            attn_mask=attn_mask)

    def _run_layers(self, x, ctx: _StepContext, start: int = 0, stop: int | None = None) -> torch.Tensor:
        cos, sin = rope_cos_sin(ctx.positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.model.layers[start:stop]:
            x = layer(x, cos, sin, ctx)
        return x

    def _check_memory(self, memory: FFNMemory | None, batch: int) -> None:
        if memory is not None and memory.n_rows != batch:
            raise ValueError(f"memory built for {memory.n_rows} rows, batch has {batch}")

    # ---- public API --------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, slots=None, memory: FFNMemory | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V) for `input_ids` (B, T); (B, 1, V) when `last_only` (saves the LM head on prefill).

        Args:
            positions: (B, T) absolute positions; default continues each row from its cache length (or 0).
            cache, slots: KV cache and one slot per row; the cache is updated in place and each slot's length
                advances by T. Use under `torch.no_grad()`.
            memory: per-row FFN-memories (a `MemoryBatch` or another `FFNMemory`, built for these B rows).
        """
        self._check_memory(memory, input_ids.shape[0])
        ctx = self._context(input_ids, positions, cache, slots, memory)
        x = self._run_layers(self.model.embed_tokens(input_ids), ctx)  # (B, T, d)
        if ctx.kv is not None:
            kv_cache, kv_slots = ctx.kv
            kv_cache.advance(kv_slots.cpu(), input_ids.shape[1])
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))

    def hidden_at(self, input_ids: torch.Tensor, layer: int, *, positions: torch.Tensor | None = None,
                  memory: FFNMemory | None = None) -> torch.Tensor:
        """Residual stream (B, T, d) entering layer `layer` (0 = the embeddings). With a frozen anchor and no
        memory below `layer`, this can be cached once per document and fed to `forward_from`."""
        if not 0 <= layer <= self.config.n_layers:
            raise ValueError(f"layer must be in [0, {self.config.n_layers}], got {layer}")
        self._check_memory(memory, input_ids.shape[0])
        ctx = self._context(input_ids, positions, None, None, memory)
        return self._run_layers(self.model.embed_tokens(input_ids), ctx, 0, layer)

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


def ffn_param_count(config: ModelConfig) -> int:
    """Parameters of all anchor FFNs (for 'memory size relative to the anchor' figures)."""
    return 3 * config.d_model * config.ffn_dim * config.n_layers


__all__ = ["FFNMemory", "ModelConfig", "RMSNorm", "Transformer", "apply_rope", "ffn_param_count", "rope_cos_sin"]
