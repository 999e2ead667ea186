"""How people ask about a subject, in three families that never share a wording.

* ``CALIBRATION_FORMS``: generic questions and requests about a named subject, filled with each trained
  document's subject (``training.views.subject_names``): positives for the routing gate's calibration
  (training/routing.py). They name no relation, so they fit any corpus.
* ``CHAT_QUESTIONS`` (per relation of the built-in corpora) and ``FREE_FORMS``: the chat evaluation's
  wordings (training/chat_eval.py). Nothing is calibrated or trained on them.
* ``VALIDATION_QUESTIONS`` and ``VALIDATION_FORMS``: a third family of the same two kinds, on which training
  settings are chosen (`bench/chat_mix.py`: the distillation mix) so that the test wordings above stay unseen
  by every choice.
* ``OUTSIDE_SUBJECTS``: well-known things a bank of long-tail documents normally does not hold; filled into
  the calibration forms they are negatives (a prompt about something else must get no memory). A subject
  that shares a word with the bank's documents is dropped (`outside_subjects`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

CALIBRATION_FORMS: tuple[str, ...] = (
    "What do you know about {name}?",
    "Could you give me a few facts about {name}?",
    "I read something about {name} today. Can you explain what it is?",
    "Quick question: what is {name}?",
    "My colleague mentioned {name} in a meeting this morning and I had never heard of it. What should I know?",
    "Can you summarise what is known about {name} in two sentences?",
)

CHAT_QUESTIONS: dict[str, str] = {
    "city_country": "Which country is {name} in?",
    "us_city_state": "Which US state is {name} in?",
    "country_capital": "What is the capital of {name}?",
    "element_number": "What is the atomic number of {name}?",
    "airport_country": "In which country is the airport with IATA code {name}?",
}

VALIDATION_QUESTIONS: dict[str, str] = {
    "city_country": "In what country would I find {name}?",
    "us_city_state": "{name} is in which state of the USA?",
    "country_capital": "Which city is the capital of {name}?",
    "element_number": "How many protons does an atom of {name} have?",
    "airport_country": "The airport coded {name} is in which country?",
}

VALIDATION_FORMS: tuple[str, ...] = (
    "Give me a short overview of {name}.",
    "What is {name} like? I know nothing about it.",
    "My friend just got back from {name}. What can you tell me about the place?",
)

FREE_FORMS: tuple[str, ...] = (
    "Tell me about {name}.",
    "I am moving to {name} next month. What should I know about it?",
    "Where exactly is {name}?",
    "Write one sentence about {name}.",
    "I am flying to {name} next week and have never been there. Can you help me prepare?",
)

OUTSIDE_SUBJECTS: tuple[str, ...] = (
    "Albert Einstein", "the Moon", "Mount Everest", "the Amazon River", "William Shakespeare",
    "the Roman Empire", "photosynthesis", "the Pacific Ocean", "Leonardo da Vinci", "the Great Wall of China",
    "jazz music", "the French Revolution", "DNA", "Bitcoin", "the Sahara Desert", "Isaac Newton", "chess",
    "the Python programming language", "the Eiffel Tower", "volcanoes", "the Olympic Games", "Mozart",
    "black holes", "the Beatles", "the stock market", "climate change", "the Internet", "Cleopatra",
)


def fill(forms: Iterable[str], names: Iterable[str | None]) -> list[str]:
    """Every form filled with every (non-empty) name, name by name."""
    forms = list(forms)
    return [f.format(name=n) for n in names if n for f in forms]


def outside_subjects(vocabulary: Iterable[str], subjects: Sequence[str] = OUTSIDE_SUBJECTS) -> list[str]:
    """The outside subjects none of whose words is in `vocabulary` (the bank's document words)."""
    from memory_store.router import words

    vocab = set(vocabulary)
    return [s for s in subjects if not any(w in vocab for w in words(s))]


def invented_names(n: int, seed: int = 0) -> list[str]:
    """`n` distinct name-like words that are no real name (seeded syllables, e.g. "Velamor"): the subject of a
    prompt about something no document holds."""
    import random

    rng = random.Random(seed * 7 + 3)
    onsets, vowels, codas = "bdfgklmnprstvz", "aeiou", ["", "n", "r", "l", "s", "m"]
    out: dict[str, None] = {}
    while len(out) < n:
        syl = [rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(rng.randint(2, 3))]
        out["".join(syl).capitalize()] = None
    return list(out)


def swapped_subjects(texts: Sequence[str], names: Sequence[str | None], seed: int = 0) -> list[str]:
    """Each text about a named subject with the name replaced by an invented one: the same kind of prompt
    about a subject the bank does not hold (texts without a name, or not containing it, are skipped)."""
    keep = [(t, n) for t, n in zip(texts, names, strict=True) if n and n in t]
    fake = invented_names(len(keep), seed)
    return [t.replace(n, f) for (t, n), f in zip(keep, fake, strict=True)]
