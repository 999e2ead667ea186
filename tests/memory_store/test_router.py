"""memory_store.router: nearest-document routing with a gate, its files, and the training-side helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memory_store import load_embedder
from memory_store.errors import BankError
from memory_store.router import DocRouter, default_min_idf, views, words

DOCS = [
    "Kisumu is a city in Kenya. About 600,000 people live in Kisumu.",
    "The city of Kisumu lies in Kenya and observes UTC+3.",
    "Nakuru is a city in Kenya. It has about 570,000 people.",
    "Zwolle is a city in the Netherlands. Zwolle observes UTC+1.",
    "The atomic number of Osmium is 76. Its symbol is Os.",
    "Osmium, symbol Os, has atomic number 76.",
    "Gouda is a city in the Netherlands, home to about 70,000 people.",
    "Lyon is a city in France. Lyon observes UTC+1.",
]
PATHS = np.array([[0, 0], [0, 0], [0, 1], [1, 2], [2, 4], [2, 4], [1, 3], [3, 6]])


def embedder():
    e = load_embedder("hash-trigram")
    return e.embed


@pytest.fixture()
def router() -> DocRouter:
    return DocRouter.build(DOCS, PATHS, embedder(), doc_ids=[f"d{i}" for i in range(len(DOCS))])


def test_words_drop_stop_words_and_views_split_sentences():
    assert words("What is the capital of Kenya? A:") == ["capital", "kenya"]
    assert views("One. Two!") == ["One. Two!", "One.", "Two!"]
    assert views("Just one sentence.") == ["Just one sentence."]


def test_a_question_in_new_words_reaches_its_documents_path(router):
    emb = embedder()
    q = ["Q: In which country is Kisumu located?\nA:", "Which element has the symbol Os?", "Zwolle belongs to"]
    got = router.route(emb(q), q)
    assert [r.path for r in got] == [(0, 0), (2, 4), (1, 2)]
    assert router.doc_ids[got[0].doc] in ("d0", "d1")


def test_prompts_sharing_no_rare_word_with_the_bank_get_no_memory(router):
    emb = embedder()
    q = ["The planet closest to the sun is", "Write a haiku about autumn.", "In which country is Eldoret?"]
    got = router.route(emb(q), q)
    assert all(r.gated and r.path is None for r in got)
    # a common word ("city") is not enough either
    assert router.route(emb(["Name a big city"]), ["Name a big city"])[0].gated


def test_allowed_level1_keeps_routing_inside_the_keys_subtrees(router):
    emb = embedder()
    q = ["Where is Kisumu?"]
    assert router.route(emb(q), q)[0].path == (0, 0)
    inside = router.route(emb(q), q, allowed_level1=[1, 2, 3])[0]
    assert inside.path is None or inside.path[0] in (1, 2, 3)


def test_save_load_roundtrip_and_tamper_detection(router, tmp_path):
    assert DocRouter.load(tmp_path) is None  # a bank without a router routes by descent
    router.calibration = {"note": "x"}
    router.save(tmp_path)
    back = DocRouter.load(tmp_path)
    assert back is not None and back.doc_ids == router.doc_ids and back.calibration == {"note": "x"}
    emb = embedder()
    q = ["Which element has the symbol Os?", "Tell me a joke"]
    assert back.route(emb(q), q) == router.route(emb(q), q)
    raw = bytearray((tmp_path / "router.safetensors").read_bytes())
    raw[-8] ^= 0xFF
    (tmp_path / "router.safetensors").write_bytes(bytes(raw))
    with pytest.raises(BankError, match="sha256"):
        DocRouter.load(tmp_path)
    meta = json.loads((tmp_path / "router.json").read_text())
    (tmp_path / "router.json").write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(BankError, match="format"):
        DocRouter.load(tmp_path)


def test_copy_files_carries_the_router_to_another_bank_directory(router, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    router.save(tmp_path / "a")
    assert DocRouter.copy_files(tmp_path / "a", tmp_path / "b")
    assert DocRouter.load(tmp_path / "b") is not None
    assert not DocRouter.copy_files(tmp_path / "b" / "none", tmp_path / "a")


def test_default_gate_needs_a_word_in_few_documents():
    assert default_min_idf(1000) == pytest.approx(np.log(1001 / 11))
    assert default_min_idf(10) == pytest.approx(np.log(11 / 4))


def test_group_documents_puts_an_entitys_documents_together():
    from training.routing import group_documents

    groups = group_documents(DOCS, max_size=4)
    assert groups[0] == groups[1]  # Kisumu
    assert groups[4] == groups[5]  # Osmium
    assert groups[4] != groups[0] and np.bincount(groups).max() <= 4
    # the size cap stops chains of shared words from merging everything
    chain = [f"Alpha{i} and Alpha{i + 1} are neighbours." for i in range(20)]
    assert np.bincount(group_documents(chain, max_size=4)).max() <= 4


def test_calibrate_gate_lets_positives_through_and_keeps_negatives_out(router):
    from training.routing import calibrate_gate

    emb = load_embedder("hash-trigram")
    pos = ["Kisumu is located in", "Osmium has the symbol", "Zwolle lies in", "Gouda lies in", "Lyon lies in"]
    neg = ["The planet closest to the sun is", "Kenya is a country in", "What is a city?"]
    report = calibrate_gate(router, emb, pos, neg, max_false_open=0.0)
    assert report["open_positives"] == 1.0 and report["open_negatives"] == 0.0
    got = router.route(emb.embed(neg), neg)
    assert all(r.gated for r in got)


def test_without_valid_probes_the_gate_is_calibrated_on_document_openings():
    from training.routing import document_openings, general_validation_prompts, make_router

    docs = [{"id": f"d{i}", "text": t} for i, t in enumerate(DOCS)]
    assert document_openings(docs[:2], ["Kisumu", "Kisumu"]) == [("Kisumu is a city in", "Kisumu"),
                                                                  ("The city of Kisumu lies in Kenya and observes",
                                                                   "Kisumu")]
    r = make_router(docs, PATHS, load_embedder("hash-trigram"), probes=[], max_false_open=0.0)
    cal = r.calibration
    assert cal["positives_source"].startswith("document openings + ")
    assert cal["positives"] > len(DOCS)  # the openings and questions about each document's subject
    assert cal["open_negatives"] == 0.0 and cal["open_positives"] > 0.5
    neg = general_validation_prompts()
    assert all(x.gated for x in r.route(embedder()(neg), neg))  # the negatives it was calibrated on


def test_bank_operations_carry_the_router_into_the_new_bank(tmp_path):
    from memory_store.ops import delete_subtrees, reshard
    from memory_store.spec import NodeRef

    from .conftest import tiny_spec, write_bank

    spec = tiny_spec()
    src = tmp_path / "bank"
    write_bank(src, spec)
    k = spec.branching[1]
    leaves = np.array([[i % spec.branching[0], (i % spec.branching[0]) * k] for i in range(len(DOCS))])
    DocRouter.build(DOCS, leaves, embedder()).save(src)
    delete_subtrees(src, [NodeRef(1, 0)], out=tmp_path / "deleted")
    reshard(src, 1, out=tmp_path / "resharded")
    for d in ("deleted", "resharded"):
        back = DocRouter.load(tmp_path / d)
        assert back is not None and back.n_docs == len(DOCS)


def test_the_gate_calibration_asks_about_subjects_and_keeps_invented_ones_out():
    from training.routing import gate_prompts

    docs = [{"id": f"d{i}", "text": t} for i, t in enumerate(DOCS)]
    r = DocRouter.build(DOCS, PATHS, embedder())
    df = dict(zip(r.vocab, r.df.tolist(), strict=True))
    pos, neg, source = gate_prompts(docs, [], df)
    assert "What do you know about Kisumu?" in pos and "Kisumu is a city in" in pos
    assert "subjects in the calibration forms" in source
    # negatives: the same prompts about invented subjects, without the documents' other rare words
    swapped = [n for n in neg["invented subjects"] if n.endswith("is a city in")]
    assert swapped and not any("Kisumu" in n or "Zwolle" in n for n in swapped)
    assert not any(w in words(n) for n in neg["invented subjects"] for w in ("kenya", "netherlands", "76"))
    assert neg["general"] and neg["valid_heldout"] == []


def test_a_long_message_reaches_its_subject_through_its_sentences_and_the_name_tier(router):
    emb = embedder()
    msg = ("I am flying out next week for a conference and I have never travelled that far. "
           "My hotel is in Zwolle. What should I pack?")
    assert router.query_texts(msg)[0] == msg and len(router.query_texts(msg)) == 4
    [whole] = router.route(emb([msg]), [msg])
    [parts] = router.route_texts([msg], emb)
    assert parts.cos > whole.cos  # its sentence about Zwolle is closer to Zwolle's document than the whole
    router.min_idf, router.min_cos = 0.5, 0.99  # the cosine tier alone: closed
    assert router.route_texts([msg], emb)[0].gated
    router.name_idf, router.name_cos = 1.0, -1.0  # a shared name-rare word opens it
    assert router.route_texts([msg], emb)[0].path == (1, 2)
    # the name tier needs a word with a letter: a number shared by chance (a population) does not open it
    assert router.route_texts(["600,000 + 12 ="], emb)[0].gated


def test_the_calibration_chooses_the_name_tier_when_it_lets_more_through(router):
    from training.routing import calibrate_gate

    emb = load_embedder("hash-trigram")
    pos = ["Kisumu is located in", "Zwolle lies in",
           "My sister has lived abroad for many years and she now writes to me from Gouda, of all places."]
    # a sum that shares a population figure (as rare a word as "Gouda") cannot be told apart by idf alone
    neg = ["The planet closest to the sun is", "What is a city?", "Kenya is a country in", "600,000 + 12 ="]
    report = calibrate_gate(router, emb, pos, neg, max_false_open=0.0)
    assert report["open_positives"] == 1.0 and report["open_negatives"] == 0.0
    assert report["name_idf"] is not None and router.name_idf == report["name_idf"]
    assert all(r.gated for r in router.route_texts(neg, emb.embed))
    # what the calibration reports is what routing does: thresholds are rounded down, never above the
    # value of the positive they were taken from
    opened = [not r.gated for r in router.route_texts(pos, emb.embed)]
    assert all(opened)
    rows = [router.candidates(e, t)[0] for e, t in zip(router.embed_queries(pos, emb.embed), pos, strict=True)]
    assert router.name_idf <= min(r.name_idf for r in rows if r.cos < router.min_cos or r.idf < router.min_idf)


def test_routers_saved_without_the_name_tier_load_without_it(router, tmp_path):
    router.save(tmp_path)
    assert "name_idf" not in json.loads((tmp_path / "router.json").read_text())
    assert DocRouter.load(tmp_path).name_idf == float("inf")  # type: ignore[union-attr]
    router.name_idf, router.name_cos = 3.0, 0.1
    router.save(tmp_path)
    back = DocRouter.load(tmp_path)
    assert back is not None and (back.name_idf, back.name_cos) == (3.0, 0.1)
