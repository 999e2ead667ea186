import json

from training.corpus import Corpus, build_facts_corpus, corpus_summary
from training.routing import PARAPHRASES


def test_default_corpus_has_enough_facts_relations_and_buckets():
    corpus = build_facts_corpus()
    s = corpus_summary(corpus)
    assert s["trained_facts"] >= 2000
    relations = {p.relation for p in corpus.probes}
    assert len(relations) >= 3
    assert set(PARAPHRASES) >= relations
    for rel in relations:
        assert {p.bucket for p in corpus.probes if p.relation == rel} == {1, 2, 3, 4, 5}
    # popularity is real: bucket 1 of cities is more populous than bucket 5
    pop = {b: [p.popularity for p in corpus.probes if p.relation == "city_country" and p.bucket == b]
           for b in (1, 5)}
    assert min(pop[1]) > max(pop[5])


def test_heldout_facts_are_never_stated_and_trained_ones_are(corpus_dir):
    corpus = Corpus.load(corpus_dir)
    texts = {d["id"]: d["text"] for d in corpus.docs}
    all_text = "\n".join(texts.values())
    held = [p for p in corpus.probes if p.split == "heldout"]
    assert held
    for p in held:
        assert p.prompt + p.answer not in all_text
        assert p.doc_id is None
    for p in corpus.probes:
        if p.split == "train":
            assert texts[p.doc_id].startswith(p.prompt + p.answer)
            assert p.answer.startswith(" ") and len(p.answer.split()) <= 6


def test_corpus_roundtrip_and_format(tmp_path, corpus_dir):
    corpus = Corpus.load(corpus_dir)
    corpus.save(tmp_path)
    again = Corpus.load(tmp_path)
    assert again.docs == corpus.docs and again.probes == corpus.probes
    first = json.loads((tmp_path / "probes.jsonl").read_text().splitlines()[0])
    assert {"prompt", "answer", "bucket", "relation", "split"} <= set(first)
