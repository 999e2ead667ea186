"""The server over the real tiny anchor and a synthetic bank (local files): batching is exact, memory
is the routed path, and a bank built for another anchor is refused."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from lm import MemoryBatch, SamplingParams, generate, load_anchor
from memory_store import AnchorIdentity, Bank, BankMismatch, BankSpec, load_embedder, path_refs
from memory_store.synth import synth_bank
from services.model_server.app import create_app
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
    # float32: outputs are compared with lm.generate's float32 reference token for token (the bfloat16 path
    # has its own agreement test, tests/lm/test_fast.py)
    settings = ModelServerSettings(anchor="tiny", bank=bank_dir, max_batch=4, max_seq_len=128, prefill_chunk=3,
                                   dtype="float32")
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
    with pytest.raises(BankMismatch, match="built for anchor llama"):
        create_app(ModelServerSettings(anchor="tiny", bank=other, max_seq_len=64))


@pytest.mark.parametrize("weight_first", [True, False], ids=["weight-first", "input-first"])
def test_slot_memory_matches_memory_batch_across_rebuilds(bank_dir, weight_first):
    """Pools keep blocks across compositions (rows join and leave), copy only newcomers, and compute what
    MemoryBatch computes for every composition: for the whole batch (one bmm per pool, with gaps) and for
    any subset of its rows, such as one prefilling row whose blocks sit far apart (one matmul per slot), or
    one row alone (its blocks concatenated: one matmul pair per layer). In both orientations of the products
    (the server measures which is faster on its machine)."""
    import torch

    from services.model_server.slot_memory import SlotPools, _Batched, _PerSlot

    bank = Bank.open(bank_dir)
    generic = bank.generic_block().float()

    def items(path):
        if path is None:
            return []
        if path == "generic":
            return [("g", generic)]
        return [(ref, bank.read_block(ref).float()) for ref in path_refs(path)]

    pools = SlotPools(bank.spec.memory_layers, weight_first=weight_first)
    compositions = [
        [[1, 5], [1, 6], None, [3, 12]],
        [[1, 5], [3, 12], [1, 5], [0, 1], [2, 9], [2, 10], "generic"],  # growth past 4 slots, shared rows
        [[0, 1], [1, 5]],  # rows left: slots compacted
        [[0, 2], [0, 1], [3, 13], [2, 9], [1, 6], [3, 14]],
    ]
    kinds, fused = set(), 0
    for comp in compositions:
        rows_items = [items(path) for path in comp]
        held = {k: b for its in rows_items for k, b in its}
        copies_before, version_before = pools.copies, pools.version
        pools.sync(held)
        assert pools.copies - copies_before <= len(held) and pools.version > version_before
        for subset in (list(range(len(comp))), [len(comp) - 1], [0, len(comp) - 1]):
            sub = [rows_items[b] for b in subset]
            keys = [[k for k, _ in its] for its in sub]
            got = pools.memory_for(keys, fuse=True)
            if not any(sub):
                assert got is None
                continue
            assert not pools.memory_for(keys)._fusable  # a one-shot forward (prefill) never concatenates
            assert got.weight_first is weight_first
            kinds |= {type(p) for p in got._plans}
            fused += got._fusable  # one row: its levels' blocks concatenated into one matmul pair per layer
            blocks = list({id(b): b for its in sub for _, b in its}.values())
            index = {id(b): i for i, b in enumerate(blocks)}
            want = MemoryBatch.build(blocks, [[index[id(b)] for _, b in its] for its in sub],
                                     bank.spec.memory_layers)
            h = torch.randn(len(sub), 2, bank.spec.d_model, generator=torch.Generator().manual_seed(len(sub)))
            for layer in bank.spec.memory_layers:
                torch.testing.assert_close(got.ffn_delta(layer, h), want.ffn_delta(layer, h), rtol=1e-4, atol=1e-4)
            assert got.ffn_delta(99, h) is None
    assert kinds == {_Batched, _PerSlot} and fused  # every loop shape, and the fused one, was exercised
    assert pools.orientation is None  # forced: nothing measured
    pools.sync({})
    assert all(not p.keys for p in pools.pools.values())
    with pytest.raises(KeyError, match="not synced"):
        pools.memory_for([[path_refs([1, 5])[0]]])



def test_memory_orientation_is_measured_once_and_used():
    """Unforced, the pools time both orientations of the memory products on this machine (once per dtype and
    width per process) and every memory they make runs the faster one."""
    import torch

    from services.model_server.slot_memory import SlotPools, measure_orientation

    pools = SlotPools([0, 1], d=32)
    assert pools.orientation is not None  # measured at construction, as a server's start-up does
    wf, m = measure_orientation(torch.float32, 32)
    assert pools.orientation == m and m["weight_first_ms"] > 0 and m["input_first_ms"] > 0
    assert wf == (m["weight_first_ms"] < m["input_first_ms"]) and m["choice"] == ("weight_first" if wf else "input_first")
    assert measure_orientation(torch.float32, 32) is measure_orientation(torch.float32, 32)  # cached
    block = torch.randn(2, 3, 4, 32)
    pools.sync({"a": block})
    assert pools.memory_for([["a"]]).weight_first is wf
    lazy = SlotPools([0, 1])  # no width given: measured when the first memory is made
    assert lazy.orientation is None
    lazy.sync({"a": block})
    assert lazy.memory_for([["a"]]).weight_first is wf and lazy.orientation == m
