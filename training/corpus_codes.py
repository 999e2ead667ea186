"""A second documents corpus of another shape: airports named by their IATA codes (the airportsdata wheel).

No setting of the project was chosen on it. Per trained airport two short documents in different wordings
("Hangzhou Xiaoshan International Airport (HGH) is an airport in Hangzhou, China." / "The IATA code HGH
belongs to ..."); probes ask the country by the code alone, in a wording no document uses. Like a user's
corpus it has no ``valid`` probes and no preserve file. Held-out airports have no document and their codes
occur in none. Airports carry no popularity figure, so every probe is in bucket 1.
"""

from __future__ import annotations

import random

from training.corpus import Corpus, Probe

DOC_TEMPLATES = (
    "{name} ({code}) is an airport in {city}, {country}.",
    "The IATA code {code} belongs to {name}, which serves {city} in {country}.",
)
PROBE_TEMPLATE = "Flights to the airport with IATA code {code} land in the country of"


def _country(alpha2: str) -> str | None:
    import pycountry

    c = pycountry.countries.get(alpha_2=alpha2)
    return getattr(c, "common_name", None) or (c.name if c is not None else None)


def build_airports_corpus(n_trained: int = 100, n_heldout: int = 50, seed: int = 0) -> Corpus:
    """`n_trained` airports with documents and `n_heldout` without, drawn seeded from the airports whose
    name says "Airport" and whose country pycountry knows."""
    import airportsdata

    rows = []
    for code, a in sorted(airportsdata.load("IATA").items()):
        country = _country(a.get("country", ""))
        if len(code) == 3 and code.isalpha() and "Airport" in a.get("name", "") and a.get("city") and country:
            rows.append((code, a["name"], a["city"], country))
    rng = random.Random(seed)
    rng.shuffle(rows)
    trained = rows[:n_trained]
    words = {w.strip("(),.") for r in trained for t in DOC_TEMPLATES
             for w in t.format(code=r[0], name=r[1], city=r[2], country=r[3]).split()}
    pick = trained + [r for r in rows[n_trained:] if r[0] not in words][:n_heldout]
    corpus = Corpus()
    for k, (code, name, city, country) in enumerate(pick):
        prompt = PROBE_TEMPLATE.format(code=code)
        if k < n_trained:
            ids = [f"airport:{code}:{j}" for j in range(len(DOC_TEMPLATES))]
            corpus.docs += [{"id": i, "text": t.format(name=name, code=code, city=city, country=country)}
                            for i, t in zip(ids, DOC_TEMPLATES, strict=True)]
            corpus.probes.append(Probe(prompt, f" {country}", 1, "airport_country", "train", entity=code,
                                       doc_id=ids[0], doc_ids=ids, template="probe:0"))
        else:
            corpus.probes.append(Probe(prompt, f" {country}", 1, "airport_country", "heldout", entity=code,
                                       template="probe:0"))
    return corpus
