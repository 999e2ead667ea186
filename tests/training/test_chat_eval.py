"""training/chat_eval.py: the chat-level evaluation's scoring, its batched greedy replies and its report."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.chat_eval import (
    ChatCase,
    chat_cases,
    chat_eval,
    chat_markdown,
    greedy_replies,
    names_subject,
    repeats_4gram,
    score,
)


def test_a_looping_reply_and_a_mangled_subject_are_caught():
    assert repeats_4gram("In the United States. In the United States. In the")
    assert not repeats_4gram("DeBary is a city in the state of Florida, in the United States.")
    assert names_subject("Amar is a city in the state of Texas.", "Amarillo") == (True, False)
    assert names_subject("Amarillo is a city in Texas.", "Amarillo") == (True, True)
    assert names_subject("It is in Texas.", "Amarillo") == (False, False)
    assert names_subject("North Nevada is a city in Nevada.", "North Las Vegas") == (True, False)
    s = score(ChatCase("trained", "Which US state is DeBary in?", "DeBary", "Florida"),
              "DeBary is in florida.")
    assert s == {"contained": True, "repeated": False, "named": True, "intact": True, "good": True}
    assert score(ChatCase("general", "Hi"), "Hello!")["contained"] is None
    assert score(ChatCase("general", "Hi"), "Hello!")["good"]  # no answer to miss
    case = ChatCase("trained", "Which US state is Amarillo in?", "Amarillo", "Texas")
    assert not score(case, "Amar is a city in the state of Texas.")["good"]  # mangled
    assert not score(case, "Amarillo is in Texas. It is in Texas. It is in Texas.")["good"]  # loops
    assert not score(case, "Amarillo is in Oklahoma.")["good"]  # wrong
    assert score(case, "It is in Texas.")["good"]  # does not name it: nothing to mangle


def test_cases_cover_every_family_once_per_entity(docs_corpus):
    from training.corpus import Corpus

    corpus = Corpus.load(docs_corpus)
    cases = chat_cases(corpus.probes, general=[{"text": "2 + 2 =", "kind": "completion"}])
    fams = {f: [c for c in cases if c.family == f] for f in ("trained", "free", "heldout", "general")}
    trained = {p.entity for p in corpus.probes if p.split == "train"}
    assert {c.subject for c in fams["trained"]} == trained and len(fams["trained"]) == len(trained)
    assert len(fams["free"]) == len(trained) and fams["general"][0].kind == "completion"
    assert all(c.subject in c.message and c.answer for c in fams["trained"] + fams["heldout"])
    few = chat_cases(corpus.probes, per_family=3, full_buckets=[5])
    rarest = {p.entity for p in corpus.probes if p.split == "train" and p.bucket == 5}
    asked = {c.subject for c in few if c.family == "trained"}
    assert rarest <= asked and len(asked - rarest) <= 3 and sum(c.family == "free" for c in few) <= 3


def test_validation_cases_ask_the_same_subjects_in_wordings_no_test_or_training_prompt_uses(docs_corpus):
    from training.chat_forms import (
        CALIBRATION_FORMS,
        CHAT_QUESTIONS,
        FREE_FORMS,
        VALIDATION_FORMS,
        VALIDATION_QUESTIONS,
    )
    from training.corpus import Corpus

    corpus = Corpus.load(docs_corpus)
    test, valid = chat_cases(corpus.probes), chat_cases(corpus.probes, validation=True)
    assert [(c.family, c.subject, c.answer) for c in test] == [(c.family, c.subject, c.answer) for c in valid]
    assert set(VALIDATION_QUESTIONS) == set(CHAT_QUESTIONS)
    others = [f.split("{name}")[0] for f in (*CHAT_QUESTIONS.values(), *FREE_FORMS, *CALIBRATION_FORMS)]
    for c in valid:
        assert not any(c.message.startswith(f) for f in others if f), c.message
    assert {c.message for c in valid}.isdisjoint(c.message for c in test)
    assert {c.message.replace(c.subject, "{name}") for c in valid if c.family == "free"} <= set(VALIDATION_FORMS)


@pytest.fixture(scope="module")
def tiny():
    from lm import load_anchor

    return load_anchor("tiny")


def test_batched_replies_equal_replies_alone_with_and_without_memory(tiny):
    from lm.generate import default_eos_ids

    model, tok = tiny.model, tiny.tokenizer
    cfg = model.config
    layers = [cfg.n_layers - 1]
    g = torch.Generator().manual_seed(0)
    blocks = {("a",): torch.randn(1, 3, 8, cfg.d_model, generator=g) * 0.5,
              ("b",): torch.randn(1, 3, 8, cfg.d_model, generator=g) * 0.5}
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("Kisumu is", "The capital of", "Osmium")]
    rows = [[("a",)], [], [("b",)]]
    eos = default_eos_ids(model, tok)
    together = greedy_replies(model, prompts, rows, blocks.get, layers, eos, n_tokens=6)
    alone = [greedy_replies(model, [p], [r], blocks.get, layers, eos, n_tokens=6)[0]
             for p, r in zip(prompts, rows, strict=True)]
    assert together == alone
    off = greedy_replies(model, prompts, [[], [], []], blocks.get, layers, eos, n_tokens=6)
    assert off[1] == together[1] and off[0] != together[0]  # the blocks change what they are given to


def test_chat_eval_reports_every_family_and_system_side_by_side(tiny, docs_corpus):
    from memory_store import load_embedder
    from training.corpus import Corpus
    from training.routing import group_documents, make_router

    corpus = Corpus.load(docs_corpus)
    model, tok = tiny.model, tiny.tokenizer
    cfg = model.config
    groups = group_documents([d["text"] for d in corpus.docs])
    paths = np.stack([groups % 2, 2 * (groups % 2) + (groups // 2) % 2], axis=1)
    router = make_router(corpus.docs, paths, load_embedder("hash-trigram"), corpus.probes)
    router.min_idf, router.min_cos = 0.0, -1.0  # the hash embedder's gate: opened for any shared word
    g = torch.Generator().manual_seed(1)
    blocks = {(lv, i): torch.randn(1, 3, 4, cfg.d_model, generator=g) for lv in (1, 2) for i in range(4)}
    cases = chat_cases(corpus.probes, general=[{"text": "The planet closest to the sun is", "kind": "completion"}],
                       per_family=4)
    emb = load_embedder("hash-trigram").embed
    report = chat_eval(model, tok, None, router, emb, corpus.docs, blocks.get, [cfg.n_layers - 1], cases,
                       n_tokens=4, samples=2)
    assert set(report["families"]) >= {"trained", "free", "general"}  # this small corpus holds nothing out
    for fam in report["families"].values():
        assert set(fam["systems"]) == {"off", "auto", "retrieval"} and fam["systems"]["off"]["unchanged"] == 1.0
    rows = report["per_case"]
    assert len(rows) == len(cases)
    # a case the gate kept closed is answered exactly as with memory off
    assert all(r["auto"]["reply"] == r["off"]["reply"] for r in rows if not r["memory_used"])
    assert any(r["memory_used"] for r in rows if r["family"] == "trained")
    md = chat_markdown(report)
    assert "| trained |" in md and "#### Sample replies: trained" in md
