"""The long-tail evaluation: its teacher-forced greedy check agrees with real generation (lm.generate), and
the tiny preset runs corpus -> train -> export -> eval end to end with JSON, Markdown and PNG reports."""

from __future__ import annotations

import json

import numpy as np
import torch

from training.corpus import Corpus, Probe
from training.prefix import prefix_hidden
from training.scoring import greedy_correct, prepare_items, text_match


def test_greedy_check_agrees_with_real_generation(corpus_dir):
    from lm import MemoryBatch, SamplingParams, generate, load_anchor

    a = load_anchor("tiny")
    model, tok = a.model, a.tokenizer
    layers = [2, 3]
    g = torch.Generator().manual_seed(3)
    block = torch.randn(2, 3, 8, model.config.d_model, generator=g) * 0.5
    prompts = [p.prompt for p in Corpus.load(corpus_dir).probes[:10]]
    for system in ("anchor", "generic"):
        mem1 = MemoryBatch.build([block], [[0]], layers) if system == "generic" else None

        def gen(prompt: str, n: int, mem=mem1) -> str:
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            return generate(model, tok, ids, SamplingParams(max_new_tokens=n, temperature=0.0), memory=mem).text

        probes = []
        for prompt in prompts:
            own = gen(prompt, 2)  # the model's own greedy words: right unless the 3rd token glues on
            for answer in (own, " Atlantis"):
                if any(c.isalnum() for c in answer):
                    probes.append(Probe(prompt=prompt, answer=answer, bucket=1, relation="r", split="train"))
        items = prepare_items(tok, probes, np.zeros((len(probes), 2), dtype=np.int64))
        hidden = prefix_hidden(model, [it.ids for it in items], 2)
        got, _ = greedy_correct(model, tok, items, hidden, 2, system, {"generic": block}, layers, batch_size=5)
        truth = np.array([text_match(gen(p.prompt, it.n_answer + 4), p.answer)
                          for p, it in zip(probes, items, strict=True)])
        assert truth.any() and not truth.all()
        np.testing.assert_array_equal(got, truth)


def test_tiny_preset_builds_and_evaluates(tmp_path):
    from memory_store import Bank
    from training.pipeline import run_build

    out = run_build("tiny", bank_dir=tmp_path / "bank", work=tmp_path / "work", rag=(1, 3))
    result = out["result"]
    assert Bank.open(tmp_path / "bank").bank_id == result["bank_id"]
    report = tmp_path / "work" / "eval"
    assert json.loads((report / "longtail.json").read_text())["bank_id"] == result["bank_id"]
    assert (report / "longtail.png").stat().st_size > 1000
    assert "hierarchical" in (report / "longtail.md").read_text()
    assert set(result["accuracy"]) == {"anchor", "generic", "hierarchical", "hierarchical_deleted", "rag1", "rag3"}
    # the retrieval baseline puts documents before the prompt: more of them, more prompt tokens
    cost = result["cost"]
    assert 0 < cost["rag1"]["extra_prompt_tokens"] < cost["rag3"]["extra_prompt_tokens"]
    assert cost["hierarchical"]["extra_prompt_tokens"] == 0
    # routing columns, in aggregate and per probe
    routing = result["routing"]
    assert routing["router"] == "documents + gate" and 0 <= routing["reached"] <= 1
    rows = [json.loads(line) for line in (report / "probes.jsonl").read_text().splitlines()]
    assert len(rows) == result["n"]["train"] + result["n"]["heldout"]
    assert all((r["reached"] is None) == (r["split"] == "heldout") for r in rows)
    # general prompts: descent gives every prompt memory, the gated router at most as many
    general = result["general"]["systems"]
    assert general["tree descent"]["memory_share"] == 1.0
    assert general["auto (router + gate)"]["memory_share"] <= general["router, gate ignored"]["memory_share"]
    assert all(0 <= v["identical"] <= 1 and v["mean_kl"] >= 0 for v in general.values())
    broken = result["broken_facts"]  # listed one by one, with where they route
    assert len(broken) == result["broken"]["hierarchical"]["count"]
    assert all(len(b["path"]) == 2 and b["answer"].startswith(" ") for b in broken)
    d = result["deletion"]
    assert d["n_inside"] + d["n_rest"] == result["n"]["train"]
    # deleting a subtree leaves the facts routed elsewhere exactly as they were
    assert d["rest"]["hierarchical_deleted"] == d["rest"]["hierarchical"]
    # a second run resumes: nothing is trained or evaluated again
    again = run_build("tiny", bank_dir=tmp_path / "bank", work=tmp_path / "work")
    assert again["status"]["stages"] == out["status"]["stages"]
    # another bank directory for the same work: exported from the finished job, not trained again
    third = run_build("tiny", bank_dir=tmp_path / "bank2", work=tmp_path / "work")
    assert Bank.open(tmp_path / "bank2").bank_id == result["bank_id"]
    assert third["status"]["stages"] == out["status"]["stages"]


def test_a_build_without_the_generic_control_serves_and_evaluates_without_one(tmp_path):
    """`hiermem build --no-generic` (what the demo bank uses): no generic memory is trained, the job and the
    bank hold none, and the evaluation reports the other systems without a generic row."""
    from safetensors.torch import load_file

    from memory_store import Bank
    from memory_store.ops import verify_bank
    from training.pipeline import run_build

    out = run_build("tiny", bank_dir=tmp_path / "bank", work=tmp_path / "work",
                    train_overrides={"generic_prob": 0.0})
    assert "generic" not in load_file(str(tmp_path / "work" / "job" / "memory.safetensors"))
    bank = Bank.open(tmp_path / "bank")
    assert bank.generic_block() is None and bank.manifest["generic"] is None
    assert verify_bank(tmp_path / "bank").ok
    acc = out["result"]["accuracy"]
    assert set(acc) == {"anchor", "hierarchical", "hierarchical_deleted"}
    assert set(out["result"]["broken"]) == {"hierarchical"}
    # `hiermem eval longtail --chat N`: the chat-level families beside the completion probes
    from training.evaluate import evaluate_longtail

    result = evaluate_longtail(tmp_path / "bank", tmp_path / "work" / "corpus", out_dir=tmp_path / "chat",
                               general=False, chat=2, progress=False)
    chat = result["chat"]
    assert {"trained", "free", "general"} <= set(chat["families"]) and chat["rarest_bucket"] == 5
    rarest = {p["entity"] for p in map(json.loads, (tmp_path / "work" / "corpus" / "probes.jsonl").open())
              if p["split"] == "train" and p["bucket"] == 5}
    assert rarest <= {r["subject"] for r in chat["per_case"] if r["family"] == "trained"}
    assert "### Chat replies" in (tmp_path / "chat" / "longtail.md").read_text()


def test_general_use_batched_equals_one_prompt_at_a_time(monkeypatch):
    """The batched general-use check (greedy decode together, right-padded teacher forcing with per-row
    memories) gives what one `generate` and one forward per prompt give."""
    from types import SimpleNamespace

    from lm import MemoryBatch, SamplingParams, generate, load_anchor
    from training.general_use import N_TOKENS, general_use

    a = load_anchor("tiny")
    model, tok = a.model, a.tokenizer
    layers = [2, 3]
    g = torch.Generator().manual_seed(5)
    blocks = {(lvl, i): torch.randn(2, 3, 8 if lvl == 1 else 4, model.config.d_model, generator=g) * 0.7
              for lvl in (1, 2) for i in range(3)}
    rows = [{"text": t, "kind": "text"} for t in
            ("The weather today", "Two plus two is", "Once upon a time there", "A short list:", "Hello",
             "My favourite colour is blue and", "Write a poem", "Paris is the capital of", "Why is the sky")]
    paths = [(k % 3, (k + 1) % 3) if k % 4 else () for k in range(len(rows))]  # some prompts get no memory
    bank = SimpleNamespace(tree=SimpleNamespace(route=lambda emb: paths))
    source = SimpleNamespace(block=lambda key: blocks[key])
    monkeypatch.setattr("training.routing.embed", lambda texts, emb: np.zeros((len(texts), 4), dtype=np.float32))
    got = general_use(model, tok, None, bank, None, None, {"hierarchical": source}, layers, prompts=rows,
                      batch_size=4)["systems"]["tree descent"]
    same, kls = [], []
    for row, path in zip(rows, paths, strict=True):
        ids = tok(row["text"], add_special_tokens=False)["input_ids"]
        off = generate(model, tok, ids, SamplingParams(max_new_tokens=N_TOKENS, temperature=0.0)).token_ids
        if not off:
            continue
        if not path:
            same.append(True)
            kls.append(0.0)
            continue
        full = torch.tensor([ids + off])
        sl = slice(len(ids) - 1, len(ids) - 1 + len(off))
        mem = MemoryBatch.from_paths([list(enumerate(path, start=1))], source.block, layers)
        with torch.no_grad():
            lo = torch.log_softmax(model(full)[0, sl].float(), -1)
            lm = torch.log_softmax(model(full, memory=mem)[0, sl].float(), -1)
        same.append(bool((lm.argmax(-1) == torch.tensor(off)).all()))
        kls.append(float((lo.exp() * (lo - lm)).sum(-1).mean()))
    assert 0 < np.mean(kls)  # the memories do change the distributions
    assert got["identical"] == np.mean(same)
    assert abs(got["mean_kl"] - np.mean(kls)) < 1e-5
    assert got["memory_share"] == np.mean([bool(p) for p in paths])
