"""Text views of a document: who it is about, and the extra wordings of it that training may use.

* `subject_names`: the entity each document is about, found without knowing the corpus.
* `name_anaphors`: a document whose later sentences open with the subject's name instead of "It" /
  "The city" (``--name-anaphors``).
* `permuted_views`: copies of a document with its sentences in another order (``--permuted-views N``).
* `pronoun_views`: a copy whose later sentences' opening name is made "It" (``--pronoun-views``).

All are training views only: routing and preservation keep the documents as written.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Sequence


def document_frequency(docs: Sequence[dict]) -> dict[str, int]:
    """In how many documents each word (`memory_store.router.words`) appears."""
    from memory_store.router import words

    df: dict[str, int] = {}
    for d in docs:
        for w in set(words(d["text"])):
            df[w] = df.get(w, 0) + 1
    return df


# a capitalised span, with the lower-case particles of place names inside ("Aranda de Duero")
_SPAN = re.compile(r"[A-Z][\w'\-]*(?:\s+(?:(?:de|del|da|do|dos|das|la|le|les|van|von|der|den|di|du|el|al|y)\s+)?"
                   r"[A-Z][\w'\-]*)*")


def subject_names(docs: Sequence[dict], max_df: int | None = None) -> list[str | None]:
    """What each document is about: of its capitalised spans that hold a word found in at most `max_df`
    documents of the corpus (default 3% of them, at least 4: a name, not a capitalised sentence opening such
    as "Local"), the one it mentions most often; ties go to the one that opens more sentences, then the
    earlier. None when it has no such span. On the `docs` preset's corpus it names 643 of 650 documents'
    entities (its country instead for a few popular countries' documents)."""
    from memory_store.router import STOPWORDS, words

    df = document_frequency(docs)
    max_df = max(4, round(0.03 * len(docs))) if max_df is None else max_df
    out: list[str | None] = []
    for d in docs:
        seen: dict[str, list] = {}  # span -> [count, sentences opened, first offset]
        text = d["text"]
        for m in _SPAN.finditer(text):
            ws = m.group(0).split()
            while ws and ws[0].lower() in STOPWORDS:  # "The Hague" stays, "It" / "The" alone go
                ws = ws[1:]
            toks = [w for w in words(" ".join(ws)) if not w.isdigit()]
            if not toks or min(df.get(w, 0) for w in toks) > max_df:
                continue
            span = " ".join(ws)
            entry = seen.setdefault(span, [0, 0, m.start()])
            entry[0] += 1
            entry[1] += m.group(0) == span and (m.start() == 0 or text[:m.start()].rstrip()[-1:] in ".!?")
        out.append(min(seen, key=lambda s: (-seen[s][0], -seen[s][1], seen[s][2])) if seen else None)
    return out


def permuted_views(docs: Sequence[dict], n: int, seed: int = 0) -> tuple[list[dict], list[int]]:
    """Up to `n` extra training views of each document with its sentences in another order (seeded), and the
    index of the document each view comes from. A document of one sentence gets none. A fact then appears
    after other contexts than its document's own opening (the "permute" augmentation that makes stored
    knowledge extractable by questions in other words)."""
    from memory_store.router import sentences

    rng = random.Random(seed * 31 + 7)
    views: list[dict] = []
    of: list[int] = []
    for i, d in enumerate(docs):
        parts = sentences(d["text"])
        if len(parts) < 2:
            continue
        orders = [o for o in itertools.permutations(range(len(parts))) if list(o) != sorted(o)]
        for o in rng.sample(orders, min(n, len(orders))):
            views.append({**d, "id": f"{d.get('id', i)}#view{len(views)}", "text": " ".join(parts[k] for k in o)})
            of.append(i)
    return views, of


def pronoun_views(docs: Sequence[dict], names: Sequence[str | None]) -> tuple[list[dict], list[int]]:
    """One extra training view of each document whose later sentences open with its subject's name
    (`names[i]`, from `subject_names`), with those openings made "It": "Iyesi observes UTC+1. Iyesi lies in
    Nigeria." -> "Iyesi observes UTC+1. It lies in Nigeria." The first sentence keeps the name. The answer
    must then be read from the name further back, through attention, as a key-value prompt or a question
    ("City: Iyesi\nCountry:") needs; the reverse of `name_anaphors`. Returns (views, index of each view's
    document); a document with no such sentence gets none."""
    from memory_store.router import sentences

    views: list[dict] = []
    of: list[int] = []
    for i, (d, name) in enumerate(zip(docs, names, strict=True)):
        parts = sentences(d["text"])
        if not name or len(parts) < 2:
            continue
        later = [("It" + p[len(name):]) if p.startswith(name + " ") else p for p in parts[1:]]
        if later != parts[1:]:
            views.append({**d, "id": f"{d.get('id', i)}#pronoun", "text": " ".join([parts[0]] + later)})
            of.append(i)
    return views, of


_ANAPHOR = re.compile(r"^(?:It|The [a-z]+)\b(?! of\b)")


def name_anaphors(text: str, name: str | None) -> str:
    """`text` with each later sentence that does not name `name` and opens with "It" or "The <noun>" ("The
    city", but not "The population of ...") opened with `name` instead: "It lies in Germany." -> "Willebroek
    lies in Germany." A training view only (routing and preservation keep the original): a fact the document
    states with a pronoun is otherwise stored against the pronoun, and a question names the entity."""
    from memory_store.router import sentences

    parts = sentences(text)
    if not name or not parts:
        return text
    return " ".join([parts[0]] + [p if name in p else _ANAPHOR.sub(name, p, count=1) for p in parts[1:]])
