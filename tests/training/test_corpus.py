import json

from training.corpus import Corpus, build_facts_corpus, corpus_summary
from training.routing import PARAPHRASES

from .conftest import SIZES


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


def test_extra_heldout_facts_leave_the_trained_set_alone_and_touch_nothing_else():
    base = build_facts_corpus(SIZES, seed=0)
    more = build_facts_corpus(SIZES, seed=0, preserve_ratio=1.5, heldout_extra=1.0)
    assert more.docs == base.docs  # same trained facts, same documents
    key = [(p.relation, p.entity, p.split, p.bucket) for p in base.probes]
    assert set(key) <= {(p.relation, p.entity, p.split, p.bucket) for p in more.probes}
    extra = [p for p in more.probes if (p.relation, p.entity, p.split, p.bucket) not in set(key)]
    assert len(extra) >= sum(SIZES.values()) // 2
    assert all(p.split == "heldout" and p.doc_id is None for p in extra)
    entities = [(p.relation, p.entity) for p in more.probes]
    assert len(entities) == len(set(entities))  # no fact is both trained and held out, or twice held out
    preserved = {(r["relation"], r["entity"]) for r in more.preserve}
    assert len(more.preserve) > len(base.preserve) and not preserved & set(entities)
    # buckets follow the relation's popularity quantiles: a rarer extra fact never sits in a lower bucket
    for rel in SIZES:
        ex = sorted((p for p in extra if p.relation == rel), key=lambda p: -p.popularity)
        assert [p.bucket for p in ex] == sorted(p.bucket for p in ex)
        assert {p.bucket for p in ex} <= {1, 2, 3, 4, 5}
