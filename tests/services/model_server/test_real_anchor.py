"""The server over the real tiny anchor and a synthetic bank (local files): batching is exact, memory
is the routed path, and a bank built for another anchor is refused."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from lm import MemoryBatch, SamplingParams, generate, load_anchor
from memory_store import AnchorIdentity, Bank, BankSpec, load_embedder, path_refs
from memory_store.synth import synth_bank
from services.model_server.app import create_app
from services.model_server.errors import BankIdentityMismatch
from services.model_server.settings import ModelServerSettings

PROMPTS = ["The capital of France is", "Water boils at", "Photosynthesis converts", "Once upon a time"]


def _spec(anchor):
    c = anchor.config
    return BankSpec(branching=[4, 4], ranks=[8, 4], memory_layers=list(range(c.n_layers)), n_layers=c.n_layers,
                    d_model=c.d_model, dtype="float16", embedder_name="hash-trigram", embedder_dim=384)


@pytest.fixture(scope="module")
def anchor():
    return load_anchor("tiny")


@pytest.fixture(scope="module")
def bank_dir(anchor, tmp_path_factory):
    out = tmp_path_factory.mktemp("bank") / "tiny-bank"
    synth_bank(out, _spec(anchor), 2, anchor=AnchorIdentity(**anchor.identity), std=0.5)
    return out


@pytest.fixture(scope="module")
def client(bank_dir):
    settings = ModelServerSettings(anchor="tiny", bank=bank_dir, max_batch=4, max_seq_len=128, prefill_chunk=3)
    with TestClient(create_app(settings)) as c:
        yield c


def _complete(client, prompt, memory="auto", n=6):
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0,
                                             "memory": memory})
    assert r.status_code == 200, r.text
    return r.json()


def test_auto_memory_is_the_routed_path_and_changes_the_output(client, bank_dir):
    bank = Bank.open(bank_dir)
    emb = load_embedder("hash-trigram").embed([PROMPTS[0]])
    expected = [int(i) for i in bank.tree.route(emb)[0]]
    on, off = _complete(client, PROMPTS[0]), _complete(client, PROMPTS[0], "off")
    assert on["memory"]["path"] == expected and on["memory"]["levels"] == [1, 2]
    assert off["memory"]["mode"] == "off" and off["memory"]["path"] is None
    assert on["choices"][0]["text"] != off["choices"][0]["text"]
    route = client.post("/v1/route", json={"prompt": PROMPTS[0]}).json()
    assert route["path"] == expected and [n["level"] for n in route["nodes"]] == [1, 2]


def test_server_matches_lm_generate_with_and_without_memory(client, anchor, bank_dir):
    bank = Bank.open(bank_dir)
    tok = anchor.tokenizer
    ids = tok.encode(PROMPTS[1], add_special_tokens=False)
    path = [2, 9]
    blocks = [bank.read_block(r).float() for r in path_refs(path)]
    mem = MemoryBatch.build(blocks, [[0, 1]], bank.spec.memory_layers)
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    want_on = generate(anchor.model, tok, ids, params, memory=mem).text
    want_off = generate(anchor.model, tok, ids, params).text
    assert _complete(client, PROMPTS[1], path)["choices"][0]["text"] == want_on
    assert _complete(client, PROMPTS[1], "off")["choices"][0]["text"] == want_off


def test_concurrent_rows_with_different_memories_match_sequential(client):
    """Continuous batching with per-row paths (shared level-1 node in rows 0/1) gives each row exactly
    what it gets alone."""
    jobs = [(PROMPTS[0], [1, 4]), (PROMPTS[1], [1, 5]), (PROMPTS[2], "off"), (PROMPTS[3], [3, 12]),
            (PROMPTS[0], "generic"), (PROMPTS[2], [1, 4])]
    alone = [_complete(client, p, m, n=8)["choices"][0]["text"] for p, m in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: _complete(client, job[0], job[1], n=8)["choices"][0]["text"], jobs))
    assert together == alone


def test_chat_uses_the_chat_template(client, anchor):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi there"}],
                                                  "max_tokens": 3, "temperature": 0, "memory": "off"}).json()
    want = anchor.tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}],
                                                add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert r["usage"]["prompt_tokens"] == len(want)


def test_bank_for_another_anchor_is_refused(anchor, tmp_path):
    other = tmp_path / "other-bank"
    synth_bank(other, _spec(anchor), 1, anchor=AnchorIdentity(arch="llama", hash="f" * 64))
    with pytest.raises(BankIdentityMismatch, match="another|anchor"):
        create_app(ModelServerSettings(anchor="tiny", bank=other, max_seq_len=64))


def test_node_memory_matches_memory_batch(bank_dir):
    import torch

    from services.model_server.node_memory import NodeMemory

    bank = Bank.open(bank_dir)
    refs = path_refs([1, 5]) + path_refs([1, 6])[1:] + path_refs([3, 12])
    blocks = [bank.read_block(r).float() for r in refs]  # 0: 1:1, 1: 2:5, 2: 2:6, 3: 1:3, 4: 2:12
    rows = [[0, 1], [0, 2], [], [3, 4], [0, 1]]
    h = torch.randn(len(rows), 3, bank.spec.d_model, generator=torch.Generator().manual_seed(0))
    want = MemoryBatch.build(blocks, rows, bank.spec.memory_layers)
    got = NodeMemory(blocks, rows, bank.spec.memory_layers)
    for layer in bank.spec.memory_layers:
        torch.testing.assert_close(got.ffn_delta(layer, h), want.ffn_delta(layer, h), rtol=1e-4, atol=1e-4)
    assert got.ffn_delta(99, h) is None
    assert got.distinct_nbytes == sum(b.numel() * 4 for b in blocks)


@pytest.mark.parametrize("impl", ["grouped", "nodes"])
def test_other_memory_impls_serve_the_same_text(bank_dir, client, impl):
    settings = ModelServerSettings(anchor="tiny", bank=bank_dir, max_batch=4, max_seq_len=128, memory_impl=impl)
    with TestClient(create_app(settings)) as grouped:
        for prompt, mem in [(PROMPTS[0], [1, 4]), (PROMPTS[3], "generic")]:
            assert _complete(grouped, prompt, mem)["choices"][0]["text"] == \
                _complete(client, prompt, mem)["choices"][0]["text"]


def test_slot_memory_matches_memory_batch_across_rebuilds(bank_dir):
    """Pools keep blocks across compositions (rows join and leave), copy only newcomers, and compute what
    MemoryBatch computes for every composition."""
    import torch

    from services.model_server.slot_memory import SlotPools

    bank = Bank.open(bank_dir)
    cache = {}

    def blk(ref):
        if ref not in cache:
            cache[ref] = bank.read_block(ref).float()
        return cache[ref]

    pools = SlotPools(bank.spec.memory_layers)
    generic = bank.generic_block().float()
    compositions = [
        [[1, 5], [1, 6], None, [3, 12]],
        [[1, 5], [3, 12], [1, 5], [0, 1], [2, 9], [2, 10], "generic"],  # growth past 4 slots, shared rows
        [[0, 1], [1, 5]],  # rows left: slots compacted
        [[0, 2], [0, 1], [3, 13]],
    ]
    copies_before = 0
    for comp in compositions:
        blocks, index, rows = [], {}, []
        for path in comp:
            ks = []
            items = [] if path is None else [("g", generic)] if path == "generic" else \
                [(ref, blk(ref)) for ref in path_refs(path)]
            for key, b in items:
                if key not in index:
                    index[key] = len(blocks)
                    blocks.append(b)
                ks.append(index[key])
            rows.append(ks)
        got = pools.build(blocks, rows)
        want = MemoryBatch.build(blocks, rows, bank.spec.memory_layers)
        h = torch.randn(len(rows), 2, bank.spec.d_model, generator=torch.Generator().manual_seed(len(rows)))
        for layer in bank.spec.memory_layers:
            torch.testing.assert_close(got.ffn_delta(layer, h), want.ffn_delta(layer, h), rtol=1e-4, atol=1e-4)
        copies = sum(p.copies for p in pools.pools.values())
        assert copies - copies_before <= len(blocks)
        copies_before = copies
    # 5 blocks, then 6 newcomers (1:0 2:1 1:2 2:9 2:10 generic), none, then 2:2 1:3 2:13 (1:3 had left)
    assert copies_before == 5 + 6 + 0 + 3
