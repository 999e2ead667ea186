"""bench/peers.py's own pieces, without any peer: the LoRA adapters it writes for vLLM (PEFT layout, the
parameter count the issue compares with a memory path), the Zipf draw, the request bodies per system, and
the targets when a peer could not run (reported as not measured, never invented)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.peer_systems import System, lora_params, lora_shapes, make_loras, zipf_choices
from bench.peers import LOADS, ratios_and_targets

SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
           "head_dim": 64, "num_hidden_layers": 30}


def test_a_rank_64_adapter_on_every_linear_module_of_smollm2_is_19_5m_parameters():
    assert lora_params(SMOLLM2) == 19_537_920
    assert lora_shapes(SMOLLM2)["k_proj"] == (576, 192) and lora_shapes(SMOLLM2)["down_proj"] == (1536, 576)


def test_make_loras_writes_peft_adapters(tmp_path):
    from safetensors.torch import load_file

    anchor = tmp_path / "anchor"
    anchor.mkdir()
    cfg = dict(SMOLLM2, hidden_size=16, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
               head_dim=4, num_hidden_layers=2)
    (anchor / "config.json").write_text(json.dumps(cfg))
    dirs = make_loras(tmp_path / "lora", anchor, n=3, rank=4)
    assert [d.name for d in dirs] == ["a00", "a01", "a02"]
    conf = json.loads((dirs[0] / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and "gate_proj" in conf["target_modules"]
    t = load_file(str(dirs[1] / "adapter_model.safetensors"))
    assert t["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (4, 32)
    assert t["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (8, 4)
    assert sum(x.numel() for x in t.values()) == lora_params(cfg, rank=4)
    a = load_file(str(dirs[0] / "adapter_model.safetensors"))
    assert not np.allclose(a["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].float(),
                           t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].float())


def test_zipf_choices_favour_few_adapters():
    picks = zipf_choices(16, 4000, 1.1, np.random.default_rng(0))
    counts = np.bincount(picks, minlength=16)
    assert counts.max() > 0.25 * len(picks) and set(picks) <= set(range(16))


def test_request_bodies_per_system():
    req = {"prompt": "Write a short note.", "path": [3, 50, 900]}
    on = System("hiermem-on", "on", [], hiermem_memory=True).body(req, 32, 0)
    assert on["memory"] == [3, 50, 900] and on["ignore_eos"] and on["stream"] and "model" not in on
    assert System("hiermem-off", "off", [], hiermem_memory=False).body(req, 32, 0)["memory"] == "off"
    lora = System("vllm-lora16", "l", [], lora_names=["a00", "a01"]).body(req, 32, 3)
    assert lora["model"] == "a01" and "memory" not in lora
    llama = System("llamacpp-f32", "f", [], model="smollm2").body(req, 64, 0)
    assert llama["n_predict"] == 64 and llama["max_tokens"] == 64


def test_targets_only_from_what_ran():
    rows = {"hiermem-off": {"status": "ok", "8 clients": 30.0, "batch 1": 10.0, "rss_after_start_bytes": 1.2e9},
            "hiermem-on": {"status": "ok", "8 clients": 27.0, "batch 1": 9.0},
            "vllm-plain": {"status": "ok", "8 clients": 60.0, "batch 1": 20.0},
            "vllm-lora16": {"status": "did not start: ..."},
            "llamacpp-f32": {"status": "llama-server not built"}}
    ratios, targets, missed = ratios_and_targets(rows)
    by_name = {t["name"]: t for t in targets}
    assert by_name["hiermem memory off / vLLM plain, 8 clients, tok/s"]["value"] == pytest.approx(0.5)
    assert by_name["hiermem memory on (paper-sized bank) / memory off, 8 clients"]["met"]
    assert by_name["model server RSS after start, defaults, no bank (GB)"]["met"]
    assert {m["target"] for m in missed} == {"hiermem memory off / llama.cpp f32, batch 1, tok/s",
                                             "hiermem memory on / vLLM 16 LoRAs rank 64, 8 clients"}
    assert [ld.name for ld in LOADS] == ["8 clients", "batch 1"]


def test_a_peer_that_fails_in_a_later_round_keeps_the_rounds_it_completed(monkeypatch, tmp_path):
    import argparse

    import bench.peers as peers

    class Proc:
        pid, lines = 0, []

        def terminate(self, timeout):
            pass

        def output(self, n):
            return "server log"

    calls = []

    async def run_load(url, system, work, picks, max_tokens):
        calls.append(max_tokens)
        if len(calls) > 3:  # warm-up, then round 1's two loads; round 2 drops the connection
            raise RuntimeError("Server disconnected without sending a response.")
        return {"tok_s": 10.0 * len(calls), "tokens": 1, "wall_s": 1.0, "memory_degraded_requests": 0}

    monkeypatch.setattr(peers, "start", lambda system, timeout: (Proc(), "http://x", 1.0))
    monkeypatch.setattr(peers, "run_load", run_load)
    monkeypatch.setattr(peers, "tree_rss_bytes", lambda pid: 1)
    system = System("llamacpp-f32", "llama.cpp F32", ["llama-server"])
    workloads = {ld.name: ([[{}]], [[0]]) for ld in LOADS}
    args = argparse.Namespace(start_timeout=1.0, peers_dir=tmp_path)
    row = peers.measure(system, LOADS, 2, workloads, args)
    assert row["status"].startswith("ok in 1 of 2 round(s); then failed under load: RuntimeError")
    assert (row["8 clients"], row["batch 1"]) == (20.0, 30.0)
    _, targets, _ = ratios_and_targets({"hiermem-off": {"status": "ok", "batch 1": 45.0}, "llamacpp-f32": row})
    assert {t["name"]: t["value"] for t in targets}["hiermem memory off / llama.cpp f32, batch 1, tok/s"] == 1.5
    failed = peers.measure(system, LOADS, 2, workloads, args)  # fails in the warm-up: no figures at all
    assert failed["status"].startswith("failed under load") and "8 clients" not in failed
