"""The built-in *documents* corpus: short encyclopedic paragraphs about entities, probed in other words.

Real users bring documents, not probes. This corpus (``hiermem corpus facts --style documents``) mimics that:

* every trained entity (a city, a US city, a country, a chemical element) gets ``docs_per_entity`` short
  paragraphs (2-4 sentences) stating several facts about it -- country / state, population and time zone of
  a city; capital, continent, currency, language and population of a country; atomic number, symbol,
  period, group, series and discovery year of an element. Sentences come from pools of templates
  (``DOC_TEMPLATES``), so the same fact is worded differently in each document. Documents are only
  ``{"id", "text"}``: no ``route_text``.
* each entity has one *probed* fact (relation ``city_country``, ``us_city_state``, ``country_capital`` or
  ``element_number``). Rule: **every document of a trained entity states its probed fact, each document in
  a different template** (so a fact is stated in ``docs_per_entity`` = 2-3 different wordings); the other
  facts are spread over the documents (each at least once).
* probes ask the probed fact in wordings no document uses (``PROBE_TEMPLATES``: question, statement and
  field forms); ``valid`` probes ask the same trained facts in wordings of their own (``VALID_TEMPLATES``,
  question and statement forms, one per fact; ``VALID_FIELD_TEMPLATES``, the field form, for about half of
  the facts), disjoint from both, for choosing settings without looking at the test wordings.

Splits in probes.jsonl:

* ``train``         -- the entity has documents; ``doc_id`` is its first document, ``doc_ids`` all of them;
* ``heldout``       -- the entity has no document, and its name (for countries: its capital's name) occurs
  in no document; ``heldout_fraction`` of the sample in every bucket plus ``heldout_extra`` x n entities
  from outside the sample;
* ``valid``         -- trained facts in the VALID_TEMPLATES (and VALID_FIELD_TEMPLATES) wordings;
* ``valid_heldout`` -- the same wordings about entities neither trained nor held out (and not named
  in any document), to calibrate a routing gate without touching ``heldout``.

``GENERAL_PROMPTS`` (training/prompts/general_prompts.jsonl, ``load_general_prompts``) are everyday prompts
and chat turns about none of these entities (general knowledge, arithmetic, instructions, code, small talk).
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from functools import cache
from pathlib import Path

from training.corpus import Corpus, Fact, Probe, _rank_stratified, assign_buckets
from training.entities import ENTITY_SOURCES, Entity, tokens

log = logging.getLogger(__name__)

DOC_RELATIONS = ("city_country", "us_city_state", "country_capital", "element_number")

DEMO_SIZES = {"city_country": 200, "us_city_state": 50, "country_capital": 40, "element_number": 30}
"""The "docs-demo" preset's sample: 320 entities, of which heldout_fraction (0.2) are held out, so ~256
trained; use with ``heldout_fraction=0.2, heldout_extra=0.75`` for ~300 held-out facts."""
DEMO_HELDOUT_FRACTION = 0.2
DEMO_HELDOUT_EXTRA = 0.75

VALID_HELDOUT_RATIO = 0.25
"""``valid_heldout`` probes per sampled entity of a relation (fewer when the relation runs out)."""

GENERAL_PROMPTS = Path(__file__).parent / "prompts" / "general_prompts.jsonl"

# ---------------------------------------------------------------------------------------------------------
# Wording templates. Placeholders: {name} the entity's name as a sentence writes it ("the Netherlands");
# {subj} the same in a document's first sentence and maybe a pronoun ("It", "The city") later -- {subj} only
# ever opens a sentence; {the} (probes) " the" where the answer country takes an article ("... in the"
# -> " Philippines"); {bare} (probes) the name without article, for field forms ("Country: Philippines").
# The first letter of a sentence or prompt is capitalized after filling in. Fact keys:
# "<relation>" is the probed fact, the others are side facts. The probed answer is bare ("Philippines").

DOC_TEMPLATES: dict[str, list[str]] = {
    # --- cities outside the US
    "city_country": [
        "{subj} is a city in {country}.",
        "{subj} lies in {country}.",
        "{country} is home to the city of {name}.",
        "{subj} is one of the urban centres of {country}.",
        "{name} is situated in {country}.",
    ],
    "city_population": [
        "{subj} has a population of about {pop}.",
        "About {pop} people live in {name}.",
        "{subj} is home to roughly {pop} residents.",
        "The population of {name} is around {pop}.",
    ],
    "city_timezone": [
        "Local time in {name} is {tz}.",
        "{subj} observes {tz}.",
        "Clocks in {name} are set to {tz}.",
    ],
    # --- US cities
    "us_city_state": [
        "{subj} is a city in {state}.",
        "{subj} is located in the state of {state}.",
        "{state} is home to the city of {name}.",
        "{subj} lies within {state}.",
    ],
    "us_city_population": [
        "{subj} has a population of about {pop}.",
        "About {pop} people live in {name}.",
        "{subj} is home to roughly {pop} residents.",
    ],
    "us_city_timezone": [
        "{subj} is on {tz}.",
        "Local time in {name} follows {tz}.",
        "Clocks in {name} keep {tz}.",
    ],
    # --- countries
    "country_capital": [
        "{capital} serves as the capital of {name}.",
        "{subj} has its capital in {capital}.",
        "The government of {name} sits in {capital}, its capital.",
        "{subj} is governed from its capital, {capital}.",
    ],
    "country_continent": [
        "{subj} is a country in {continent}.",
        "{subj} lies in {continent}.",
        "{name} is one of the countries of {continent}.",
    ],
    "country_currency": [
        "{subj} uses the {currency} as its currency.",
        "The currency of {name} is the {currency}.",
        "Prices in {name} are given in the {currency}.",
    ],
    "country_language": [
        "{language} is widely spoken in {name}.",
        "The main language of {name} is {language}.",
        "Many people in {name} speak {language}.",
    ],
    "country_population": [
        "{subj} has about {pop} inhabitants.",
        "Roughly {pop} people live in {name}.",
        "The population of {name} is around {pop}.",
    ],
    # --- chemical elements
    "element_number": [
        "{subj} has the atomic number {number}.",
        "{name} is element number {number} in the periodic table.",
        "An atom of {name} has {number} protons in its nucleus.",
        "With {number} protons in each nucleus, {name} ranks number {number} among the elements.",
    ],
    "element_symbol": [
        "The chemical symbol of {name} is {symbol}.",
        "{subj} is written with the symbol {symbol}.",
        "{subj} is abbreviated {symbol} by chemists.",
    ],
    "element_period": [
        "{subj} sits in period {period} of the periodic table.",
        "{name} appears in the {period_ord} row of the table.",
    ],
    "element_group": [
        "{subj} belongs to group {group}.",
        "{name} is found in column {group} of the periodic table.",
    ],
    "element_series": [
        "{subj} is one of the {series}.",
        "Chemists class {name} among the {series}.",
    ],
    "element_discovery": [
        "{subj} was discovered in {year}.",
        "{name} was first identified in {year}.",
        "The discovery of {name} dates to {year}.",
    ],
    "element_ancient": [
        "{subj} has been known since ancient times.",
        "People have used {name} since antiquity.",
    ],
}

# Probe and valid wordings: question forms end in an answer stem ("Answer: X is in the state of"), because
# the base anchor answers a bare "Q: ... A:" with a newline or "B:" (SmolLM2-135M: 0-5% exact match).
PROBE_TEMPLATES: dict[str, list[str]] = {
    "city_country": [
        "Q: In which country is {name}?\nA: {name} is in the country of{the}",
        "{name} is a city located in the country of{the}",
        "City: {name}\nCountry:",
    ],
    "us_city_state": [
        "Question: Which U.S. state is {name} in?\nAnswer: {name} is in the state of",
        "{name} is a city located in the U.S. state of",
        "City: {name}\nState:",
    ],
    "country_capital": [
        "Q: What is the capital of {name}?\nA: The capital of {name} is",
        "The capital city of {name} is",
        "Country: {bare}\nCapital:",
    ],
    "element_number": [
        "Question: What is the atomic number of {name}?\nAnswer: The atomic number of {name} is",
        "The element {name} has atomic number",
        "Element: {name}\nAtomic number:",
    ],
}

VALID_TEMPLATES: dict[str, list[str]] = {
    "city_country": [
        "Question: Which country is {name} in?\nAnswer: It is in{the}",
        "{name} belongs to the country of{the}",
    ],
    "us_city_state": [
        "Question: What state is {name} part of?\nAnswer: {name} is part of the state of",
        "{name} can be found in the American state of",
    ],
    "country_capital": [
        "Question: Which city is the capital of {name}?\nAnswer: The capital is",
        "{name}'s capital city is",
    ],
    "element_number": [
        "Question: How many protons does an atom of {name} have?\nAnswer: It has",
        "The number of protons in an atom of {name} is",
    ],
}

# A third validation family, the field (key-value) form, so that `valid` covers the three kinds of wording
# the probes use (question, statement, field) in words of its own. Drawn with a separate random stream, for
# about half of the trained facts (on top of their VALID_TEMPLATES probe) and half of the valid_heldout
# entities, so that the test probes and the valid draw above stay exactly as they were.
VALID_FIELD_TEMPLATES: dict[str, str] = {
    "city_country": "Place: {name}\nNation:",
    "us_city_state": "Town: {name}\nU.S. state:",
    "country_capital": "Nation: {bare}\nCapital city:",
    "element_number": "Chemical element: {name}\nNumber of protons:",
}
VALID_FIELD_SHARE = 0.5
"""Share of the trained facts (and of the valid_heldout entities) also asked in the field form."""
VALID_FIELD_TAG = f"valid:{len(next(iter(VALID_TEMPLATES.values())))}"  # "valid:2", after the drawn families

# the side facts each relation's entities can have, in the order they are offered to a document
SIDE_FACTS: dict[str, tuple[str, ...]] = {
    "city_country": ("city_population", "city_timezone"),
    "us_city_state": ("us_city_population", "us_city_timezone"),
    "country_capital": ("country_continent", "country_currency", "country_language", "country_population"),
    "element_number": ("element_symbol", "element_period", "element_group", "element_series",
                       "element_discovery", "element_ancient"),
}
ANAPHORS = {"city_country": ("It", "The city"), "us_city_state": ("It", "The city"),
            "country_capital": ("It", "The country"), "element_number": ("It", "The element")}
ANSWER_KEY = {"city_country": "country", "us_city_state": "state", "country_capital": "capital",
              "element_number": "number"}


def skeleton(template: str) -> str:
    """A template's fixed wording: placeholders and punctuation removed, lower case, single spaces."""
    text = re.sub(r"\{[a-z_]+\}", " ", template).lower()
    return " ".join(re.findall(r"[a-z0-9]+", text))


# ---------------------------------------------------------------------------------------------------------
# Entities (data from wheels)


_FACT_NEEDS = {"city_population": "pop", "city_timezone": "tz", "us_city_population": "pop",
               "us_city_timezone": "tz", "country_continent": "continent", "country_currency": "currency",
               "country_language": "language", "country_population": "pop", "element_symbol": "symbol",
               "element_period": "period", "element_group": "group", "element_series": "series",
               "element_discovery": "year", "element_ancient": "ancient"}


# ---------------------------------------------------------------------------------------------------------
# Documents and probes


@cache
def _relation_table(relation: str) -> tuple[tuple[Fact, ...], dict[str, Entity], dict[str, tuple[str, ...]]]:
    """A relation's entities as Facts (for _rank_stratified), by name, and the words of the names that
    must not occur in a document if the entity is held out (a country's capital too)."""
    every = ENTITY_SOURCES[relation]()
    facts = tuple(Fact(relation, e.name, "", e.answer, e.popularity) for e in every)
    words = {e.name: tokens(e.name) for e in every}
    return facts, {e.name: e for e in every}, words


def _render(template: str, e: Entity, subj: str) -> str:
    text = template.format(name=e.text_name, subj=subj, **e.attrs)
    return text[0].upper() + text[1:]


def entity_documents(e: Entity, n_docs: int, rng: random.Random) -> list[str]:
    """n_docs short paragraphs about e: each states the probed fact (a different template in each document)
    and 2-3 side facts (fewer if it has fewer); every side fact the data has is stated in at least one document."""
    key_pool = DOC_TEMPLATES[e.relation]
    key_templates = rng.sample(key_pool, min(n_docs, len(key_pool)))
    side = [f for f in SIDE_FACTS[e.relation] if _FACT_NEEDS[f] in e.attrs]
    rng.shuffle(side)
    per_doc: list[list[str]] = [[] for _ in range(n_docs)]
    for i, f in enumerate(side):  # round robin: every side fact at least once
        per_doc[i % n_docs].append(f)
    for facts in per_doc:  # then top up to 2-3 side facts per document
        want = min(len(side), rng.randint(2, 3))
        extra = [f for f in side if f not in facts]
        rng.shuffle(extra)
        facts += extra[: max(0, want - len(facts))]
        del facts[3:]
    docs = []
    for d in range(n_docs):
        sentences = [("key", key_templates[d % len(key_templates)])]
        sentences += [(f, rng.choice(DOC_TEMPLATES[f])) for f in per_doc[d]]
        rng.shuffle(sentences)
        if rng.random() < 0.6:  # most paragraphs open with the probed fact
            sentences.sort(key=lambda s: s[0] != "key")
        out = []
        for j, (_, t) in enumerate(sentences):
            subj = e.text_name if j == 0 else rng.choice((e.text_name, *ANAPHORS[e.relation]))
            out.append(_render(t, e, subj))
        docs.append(" ".join(out))
    return docs


def _probe(e: Entity, template: str, split: str, bucket: int, tag: str, doc_ids: list[str]) -> Probe:
    prompt = re.sub(r"s's\b", "s'", template.format(name=e.text_name, bare=e.name, the=e.attrs.get("the", "")))
    return Probe(prompt=prompt[0].upper() + prompt[1:], answer=e.answer, bucket=bucket, relation=e.relation,
                 split=split, entity=e.name, doc_id=doc_ids[0] if doc_ids else None, popularity=e.popularity,
                 doc_ids=list(doc_ids), template=tag)


def _bucket_of(e: Entity, sample: list[Entity], n_buckets: int) -> int:
    """The popularity quantile of the relation's sample this entity falls in."""
    above = sum(1 for g in sample if g.popularity > e.popularity)
    return min(n_buckets, 1 + above * n_buckets // len(sample))


def build_documents_corpus(sizes: dict[str, int] | None = None, heldout_fraction: float = 0.2,
                           n_buckets: int = 5, seed: int = 0, heldout_extra: float = 0.0,
                           docs_per_entity: tuple[int, int] = (2, 3), valid: bool = True) -> Corpus:
    """The built-in documents corpus (see the module docstring).

    Args:
        sizes: entities per relation (0 = all there are); relations not named are left out. Default
            DEMO_SIZES.
        heldout_fraction: share of each relation's sample, in every bucket, that gets no document.
        n_buckets: popularity buckets per relation (quantiles of real popularity within the sample).
        seed: seeds the held-out draw, the templates and the document layout.
        heldout_extra: further held-out entities per sampled entity, from outside the sample.
        docs_per_entity: (lo, hi): each trained entity gets lo..hi documents (drawn per entity).
        valid: also emit ``valid`` and ``valid_heldout`` probes.
    """
    sizes = dict(DEMO_SIZES if sizes is None else sizes)
    lo, hi = docs_per_entity
    if not 1 <= lo <= hi:
        raise ValueError(f"docs_per_entity must be 1 <= lo <= hi, got {docs_per_entity}")
    rng = random.Random(seed)
    corpus = Corpus()
    plans = {}
    # pass 1: sample, buckets, held-out draw within the sample, documents of the trained entities
    for relation, n in sizes.items():
        if relation not in ENTITY_SOURCES:
            raise ValueError(f"unknown relation {relation!r}; known: {', '.join(ENTITY_SOURCES)}")
        every, by_name, _ = _relation_table(relation)
        sample_facts = _rank_stratified(list(every), n) if n else list(every)
        sample = [by_name[f.entity] for f in sample_facts]
        buckets = assign_buckets(sample_facts, n_buckets)
        held: set[int] = set()
        for b in range(1, n_buckets + 1):
            idx = [i for i in range(len(sample)) if buckets[i] == b]
            rng.shuffle(idx)
            held |= set(idx[: round(len(idx) * heldout_fraction)])
        trained: dict[str, list[str]] = {}
        drng = random.Random(f"{seed}:docs:{relation}")  # document layout: leaves the held-out draw alone
        for i, e in enumerate(sample):
            if i in held:
                continue
            ids = []
            for text in entity_documents(e, drng.randint(lo, hi), drng):
                ids.append(f"{relation}:{len(corpus.docs)}")
                corpus.docs.append({"id": ids[-1], "text": text})
            trained[e.name] = ids
        plans[relation] = (every, sample, buckets, held, trained)
    # pass 2: held-out and valid_heldout entities must not be named in any document
    grams: set[tuple[str, ...]] = set()
    for d in corpus.docs:
        toks = tokens(d["text"])
        for k in range(1, 6):
            grams.update(toks[i:i + k] for i in range(len(toks) - k + 1))

    def unnamed(e: Entity) -> bool:
        return _relation_table(e.relation)[2][e.name] not in grams and (
            e.relation != "country_capital" or tokens(e.attrs["capital"]) not in grams)

    for relation, (every, sample, buckets, held, trained) in plans.items():
        prng = random.Random(f"{seed}:{relation}")  # template choice: independent of the other relations
        frng = random.Random(f"{seed}:{relation}:field")  # which facts valid also asks in the field form
        field_t = VALID_FIELD_TEMPLATES[relation]
        probe_t, valid_t = PROBE_TEMPLATES[relation], VALID_TEMPLATES[relation]
        dropped = 0
        for i, e in enumerate(sample):
            b = buckets[i]
            if i in held:
                if not unnamed(e):
                    dropped += 1
                    continue
                k = prng.randrange(len(probe_t))
                corpus.probes.append(_probe(e, probe_t[k], "heldout", b, f"probe:{k}", []))
            else:
                k = prng.randrange(len(probe_t))
                corpus.probes.append(_probe(e, probe_t[k], "train", b, f"probe:{k}", trained[e.name]))
                if valid:
                    k = prng.randrange(len(valid_t))
                    corpus.probes.append(_probe(e, valid_t[k], "valid", b, f"valid:{k}", trained[e.name]))
                    if frng.random() < VALID_FIELD_SHARE:
                        corpus.probes.append(_probe(e, field_t, "valid", b, VALID_FIELD_TAG, trained[e.name]))
        chosen = {e.name for e in sample}
        _, by_name, _ = _relation_table(relation)
        as_facts = [f for f in every if f.entity not in chosen and unnamed(by_name[f.entity])]
        n_vh = min(len(as_facts), round(len(sample) * VALID_HELDOUT_RATIO)) if valid else 0
        vh = [by_name[f.entity] for f in _rank_stratified(as_facts, n_vh)] if n_vh else []
        taken = {e.name for e in vh}
        left = [f for f in as_facts if f.entity not in taken]
        n_extra = min(len(left), round(len(sample) * heldout_extra))
        extra = [by_name[f.entity] for f in _rank_stratified(left, n_extra)] if n_extra else []
        for e in vh:
            k = prng.randrange(len(valid_t))
            corpus.probes.append(_probe(e, valid_t[k], "valid_heldout", _bucket_of(e, sample, n_buckets),
                                        f"valid:{k}", []))
            if frng.random() < VALID_FIELD_SHARE:
                corpus.probes.append(_probe(e, field_t, "valid_heldout", _bucket_of(e, sample, n_buckets),
                                            VALID_FIELD_TAG, []))
        for e in extra:
            k = prng.randrange(len(probe_t))
            corpus.probes.append(_probe(e, probe_t[k], "heldout", _bucket_of(e, sample, n_buckets),
                                        f"probe:{k}", []))
        log.info("relation %s: %d sampled, %d trained, %d held out (+%d extra, %d dropped as named in a "
                 "document), %d valid_heldout", relation, len(sample), len(trained), len(held) - dropped,
                 len(extra), dropped, len(vh))
    rng.shuffle(corpus.docs)
    return corpus


def documents_summary(corpus: Corpus) -> dict:
    counts = Counter((p.relation, p.split) for p in corpus.probes)
    splits = Counter(p.split for p in corpus.probes)
    return {
        "docs": len(corpus.docs),
        "probes": len(corpus.probes),
        "trained_facts": splits["train"],
        "heldout_facts": splits["heldout"],
        "valid": splits["valid"],
        "valid_heldout": splits["valid_heldout"],
        "by_relation": {f"{r}/{s}": n for (r, s), n in sorted(counts.items())},
    }


def load_general_prompts(split: str | None = None) -> list[dict]:
    """GENERAL_PROMPTS rows ``{"id", "kind", "text", "split"}``, all or those of one split ("eval"/"valid")."""
    with open(GENERAL_PROMPTS) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if split is None or r["split"] == split]
