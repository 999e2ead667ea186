"""The built-in documents corpus (training/corpus_docs.py) and the general prompts file."""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import pytest

from training.corpus import Corpus
from training.corpus_docs import (
    ANAPHORS,
    ANSWER_KEY,
    DEMO_HELDOUT_EXTRA,
    DEMO_HELDOUT_FRACTION,
    DEMO_SIZES,
    DOC_TEMPLATES,
    PROBE_TEMPLATES,
    SIDE_FACTS,
    VALID_FIELD_TAG,
    VALID_FIELD_TEMPLATES,
    VALID_TEMPLATES,
    build_documents_corpus,
    documents_summary,
    load_general_prompts,
    skeleton,
)

SMALL = {"city_country": 40, "us_city_state": 15, "country_capital": 15, "element_number": 15}


@pytest.fixture(scope="module")
def small() -> Corpus:
    return build_documents_corpus(SMALL, heldout_fraction=0.2, heldout_extra=0.5, seed=0)


@pytest.fixture(scope="module")
def demo() -> Corpus:
    return build_documents_corpus(heldout_fraction=DEMO_HELDOUT_FRACTION, heldout_extra=DEMO_HELDOUT_EXTRA)


def _words(text: str) -> tuple[str, ...]:
    return tuple(re.findall(r"[A-Za-z0-9]+", text))


def _named(name: str, text: str) -> bool:
    """name occurs in text as whole words (the corpus's own rule: alphanumeric runs)."""
    n, t = _words(name), _words(text)
    return any(t[i:i + len(n)] == n for i in range(len(t) - len(n) + 1))


def _key_template_regex(template: str, relation: str, entity: str, answer: str) -> re.Pattern:
    name = "(?:[Tt]he )?" + re.escape(entity)  # "the Netherlands"
    subj = "|".join([name, *(re.escape(s) for s in ANAPHORS[relation])])
    parts = re.split(r"(\{[a-z_]+\})", template)
    out = []
    for part in parts:
        if part == "{subj}":
            out.append(f"(?:{subj})")
        elif part == "{name}":
            out.append(name)
        elif part == "{" + ANSWER_KEY[relation] + "}":
            out.append("(?:[Tt]he )?" + re.escape(answer))
        elif part.startswith("{"):
            out.append(".+?")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out))


def test_documents_are_plain_unique_and_shuffled(small):
    assert small.docs
    assert all(set(d) == {"id", "text"} for d in small.docs)  # no route_text
    ids = [d["id"] for d in small.docs]
    assert len(ids) == len(set(ids))
    assert [d["id"].split(":")[0] for d in small.docs] != sorted(d["id"].split(":")[0] for d in small.docs)
    for d in small.docs:
        n_sentences = d["text"].count(". ") + 1
        assert 2 <= n_sentences <= 4, d["text"]


def test_every_document_of_a_trained_entity_states_its_fact_in_a_different_wording(small):
    """The rule: each of the entity's 2-3 documents states the probed fact, each with another template."""
    texts = {d["id"]: d["text"] for d in small.docs}
    trained = [p for p in small.probes if p.split == "train"]
    assert trained
    owned: Counter = Counter()
    for p in trained:
        assert 2 <= len(p.doc_ids) <= 3 and p.doc_id == p.doc_ids[0]
        used = set()
        for doc_id in p.doc_ids:
            owned[doc_id] += 1
            text = texts[doc_id]
            assert text.startswith(p.entity) or _named(p.entity, text)
            hits = [k for k, t in enumerate(DOC_TEMPLATES[p.relation])
                    if _key_template_regex(t, p.relation, p.entity, p.answer.strip()).search(text)]
            assert hits, (p.entity, text)
            used.add(hits[0])
        assert len(used) == len(p.doc_ids), (p.entity, [texts[i] for i in p.doc_ids])
    assert set(owned) == set(texts) and set(owned.values()) == {1}  # every document is about one entity


def test_side_facts_are_spread_over_the_documents(small):
    texts = {d["id"]: d["text"] for d in small.docs}
    elements = [p for p in small.probes if p.split == "train" and p.relation == "element_number"]
    for p in elements:  # every element has a symbol and a period: both stated somewhere
        joined = " ".join(texts[i] for i in p.doc_ids)
        assert "symbol" in joined or "abbreviated" in joined
        assert "period" in joined or "row" in joined
    assert all(f in DOC_TEMPLATES for facts in SIDE_FACTS.values() for f in facts)


def test_heldout_and_valid_heldout_entities_appear_in_no_document(small):
    all_text = "\n".join(d["text"] for d in small.docs)
    words = set()
    toks = _words(all_text)
    for k in range(1, 6):
        words.update(toks[i:i + k] for i in range(len(toks) - k + 1))
    unseen = [p for p in small.probes if p.split in ("heldout", "valid_heldout")]
    assert unseen
    for p in unseen:
        assert p.doc_id is None and p.doc_ids == []
        assert _words(p.entity) not in words, p.entity
        if p.relation == "country_capital":
            assert _words(p.answer) not in words, p.answer


def test_probe_and_valid_wordings_are_used_by_no_document(demo):
    doc_skeletons = {skeleton(t) for ts in DOC_TEMPLATES.values() for t in ts}
    probe_skeletons = {skeleton(t) for ts in PROBE_TEMPLATES.values() for t in ts}
    valid_skeletons = {skeleton(t) for ts in VALID_TEMPLATES.values() for t in ts} | {
        skeleton(t) for t in VALID_FIELD_TEMPLATES.values()}
    assert not probe_skeletons & doc_skeletons
    assert not valid_skeletons & doc_skeletons
    assert not valid_skeletons & probe_skeletons
    for s in probe_skeletons | valid_skeletons:  # nor one inside the other (short skeletons aside)
        for d in doc_skeletons:
            if len(s.split()) >= 4:
                assert f" {s} " not in f" {d} ", (s, d)
            if len(d.split()) >= 4:
                assert f" {d} " not in f" {s} ", (s, d)
    all_text = "\n".join(d["text"] for d in demo.docs)
    for p in demo.probes:
        assert p.prompt not in all_text, p.prompt
        assert p.prompt.strip() + p.answer not in all_text


def test_probe_splits(small):
    by_split: dict = defaultdict(list)
    for p in small.probes:
        by_split[p.split].append(p)
    assert set(by_split) == {"train", "heldout", "valid", "valid_heldout"}
    train = {(p.relation, p.entity): p for p in by_split["train"]}
    assert len(train) == len(by_split["train"])  # one probed fact per entity
    drawn = [p for p in by_split["valid"] if p.template != VALID_FIELD_TAG]
    field = [p for p in by_split["valid"] if p.template == VALID_FIELD_TAG]
    valid = {(p.relation, p.entity): p for p in drawn}
    assert len(valid) == len(drawn) and valid.keys() == train.keys()  # one drawn valid wording per fact
    fields = {(p.relation, p.entity): p for p in field}  # and the field form for about half of them
    assert len(fields) == len(field) and fields.keys() <= train.keys()
    assert 0.3 * len(train) <= len(field) <= 0.7 * len(train)
    for key, v in [*valid.items(), *fields.items()]:
        t = train[key]
        assert v.answer == t.answer and v.doc_ids == t.doc_ids and v.bucket == t.bucket
        assert v.prompt != t.prompt
        assert v.template.startswith("valid:") and t.template.startswith("probe:")
    assert any(p.template == VALID_FIELD_TAG for p in by_split["valid_heldout"])
    keys = {s: {(p.relation, p.entity) for p in by_split[s]} for s in by_split}
    assert len(keys["heldout"]) == len(by_split["heldout"])
    assert not keys["heldout"] & keys["train"]
    assert not keys["valid_heldout"] & (keys["train"] | keys["heldout"])
    assert all(p.template.startswith("valid:") for p in by_split["valid_heldout"])
    assert all(p.template.startswith("probe:") for p in by_split["heldout"])
    for rel, n in SMALL.items():
        held = sum(1 for p in by_split["heldout"] if p.relation == rel)
        assert abs(held - n * (0.2 + 0.5)) <= 5  # per-bucket rounding, a few dropped as named in a doc
        assert sum(1 for p in by_split["train"] if p.relation == rel) >= n * 0.8 - 5  # 5 buckets
    for p in small.probes:
        assert p.answer.startswith(" ") and p.answer.strip() and len(p.answer.split()) <= 4
        assert not p.prompt.endswith(" ") and p.entity in p.prompt
    # every wording of every family is used for some relation
    tags = Counter((p.relation, p.template) for p in small.probes)
    for rel in SMALL:
        assert {t for r, t in tags if r == rel} >= {f"probe:{k}" for k in range(len(PROBE_TEMPLATES[rel]))}


def test_buckets_per_relation_follow_popularity(small):
    for rel in SMALL:
        train = [p for p in small.probes if p.relation == rel and p.split == "train"]
        assert {p.bucket for p in train} == {1, 2, 3, 4, 5}
        top = [p.popularity for p in train if p.bucket == 1]
        bottom = [p.popularity for p in train if p.bucket == 5]
        assert min(top) >= max(bottom)


def test_demo_sizes_give_the_documented_counts(demo):
    s = documents_summary(demo)
    assert sum(DEMO_SIZES.values()) == 320
    n_field = sum(1 for p in demo.probes if p.split == "valid" and p.template == VALID_FIELD_TAG)
    assert 240 <= s["trained_facts"] <= 260 and s["valid"] == s["trained_facts"] + n_field
    assert 280 <= s["heldout_facts"] <= 320
    assert s["valid_heldout"] >= 60
    assert 2 * s["trained_facts"] <= s["docs"] <= 3 * s["trained_facts"]


def test_deterministic_for_a_seed(small):
    again = build_documents_corpus(SMALL, heldout_fraction=0.2, heldout_extra=0.5, seed=0)
    assert again.docs == small.docs and again.probes == small.probes
    other = build_documents_corpus(SMALL, heldout_fraction=0.2, heldout_extra=0.5, seed=1)
    assert other.docs != small.docs


def test_extra_heldout_leaves_documents_and_valid_alone():
    base = build_documents_corpus(SMALL, heldout_fraction=0.2, seed=3)
    more = build_documents_corpus(SMALL, heldout_fraction=0.2, seed=3, heldout_extra=1.0)
    assert more.docs == base.docs
    keep = [(p.relation, p.entity, p.split) for p in base.probes]
    assert set(keep) <= {(p.relation, p.entity, p.split) for p in more.probes}
    no_valid = build_documents_corpus(SMALL, heldout_fraction=0.2, seed=3, valid=False)
    assert no_valid.docs == base.docs and {p.split for p in no_valid.probes} == {"train", "heldout"}


def test_roundtrip_keeps_doc_ids_and_writes_no_preserve(tmp_path, small):
    small.save(tmp_path)
    assert not (tmp_path / "preserve.jsonl").exists()
    again = Corpus.load(tmp_path)
    assert again.docs == small.docs and again.probes == small.probes


def test_general_prompts_sizes_and_entities(demo):
    rows = load_general_prompts()
    assert len(rows) >= 260
    assert all(set(r) == {"id", "kind", "text", "split"} for r in rows)
    assert {r["kind"] for r in rows} == {"completion", "chat"}
    assert len({r["id"] for r in rows}) == len(rows)
    ev, va = load_general_prompts("eval"), load_general_prompts("valid")
    assert len(ev) >= 200 and len(va) >= 60 and len(ev) + len(va) == len(rows)
    assert not {r["text"] for r in ev} & {r["text"] for r in va}
    names = {p.entity for p in demo.probes} | {p.answer.strip() for p in demo.probes if not p.answer.strip().isdigit()}
    for r in rows:
        toks = _words(r["text"])
        grams = {toks[i:i + k] for k in range(1, 6) for i in range(len(toks) - k + 1)}
        assert not {_words(n) for n in names} & grams, r["text"]


def test_cli_writes_the_documents_corpus(tmp_path, capsys):
    import argparse
    import json

    from training.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["corpus", "facts", "--style", "documents", "--out", str(tmp_path),
                              "--size", "city_country=20", "--size", "us_city_state=10",
                              "--size", "country_capital=10", "--size", "element_number=10",
                              "--heldout-extra", "0.5", "--docs-per-entity", "2,2"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "probes.jsonl"]
    corpus = Corpus.load(tmp_path)
    assert summary["docs"] == len(corpus.docs) == 2 * summary["trained_facts"]
    assert all("route_text" not in d for d in corpus.docs)
