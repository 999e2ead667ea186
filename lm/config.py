"""The anchor's architecture hyper-parameters (`ModelConfig`), apart from the model so that `lm.kv_cache` and
`lm.model` both import it without importing each other."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


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


__all__ = ["ModelConfig"]
