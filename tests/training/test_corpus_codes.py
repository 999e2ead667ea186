"""training/corpus_codes.py: airports named by IATA codes, a corpus of another shape."""

from __future__ import annotations

from training.corpus_codes import build_airports_corpus


def test_airports_are_asked_by_their_codes_and_held_out_codes_occur_in_no_document():
    c = build_airports_corpus(n_trained=12, n_heldout=6, seed=1)
    train = [p for p in c.probes if p.split == "train"]
    held = [p for p in c.probes if p.split == "heldout"]
    assert len(train) == 12 and len(held) == 6 and len(c.docs) == 24
    text = " ".join(d["text"] for d in c.docs)
    for p in train:
        docs = [d for d in c.docs if d["id"] in p.doc_ids]
        assert len(docs) == 2 and all(p.entity in d["text"] and p.answer.strip() in d["text"] for d in docs)
        assert p.entity in p.prompt and p.prompt not in text  # asked in a wording no document uses
    words = {w.strip("(),.") for w in text.split()}
    assert not any(p.entity in words for p in held)
    assert build_airports_corpus(n_trained=12, n_heldout=6, seed=1).docs == c.docs  # seeded


def test_the_airports_preset_builds_this_corpus():
    from training.pipeline import PRESETS, preset_corpus

    spec = {**PRESETS["airports"]["corpus"], "n_trained": 12, "n_heldout": 6, "seed": 1}
    assert preset_corpus(spec).docs == build_airports_corpus(n_trained=12, n_heldout=6, seed=1).docs
    assert PRESETS["airports"]["train"] == {}  # trained with the defaults every preset shares
