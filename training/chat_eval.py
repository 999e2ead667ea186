"""Chat-level evaluation: people's questions through the chat template, replies read as a client reads them.

Completion probes say what the memory holds; a client reads replies. For each case below the anchor
answers a chat turn (the anchor's chat template, greedy, `n_tokens` tokens) three ways, side by side:

* ``off``: the anchor alone;
* ``auto``: the memory the model server would give it (the bank's router and gate on the user's message,
  as services/model_server/resolver.py routes a chat request; a closed gate is the anchor alone);
* ``retrieval``: the anchor with the top-1 document (MiniLM + faiss over the documents) pasted before the
  question in the same message: what a user would try instead of memories.

Cases (`chat_cases`): per trained fact a chat question (`chat_forms.CHAT_QUESTIONS`), free-form requests
about trained subjects (`chat_forms.FREE_FORMS`), the same chat questions about held-out subjects, and the
general prompts (completions and chat turns). Wordings are the chat family of training/chat_forms.py:
nothing is trained or calibrated on them.

Per reply: the answer contained (case-insensitive), a repeated word 4-gram (a looping reply), the subject's
name intact where the reply names it (a word sharing the name's first four letters counts as naming it; the
full name must then appear), and whether memory was used.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from training.chat_forms import CHAT_QUESTIONS, FREE_FORMS, VALIDATION_FORMS, VALIDATION_QUESTIONS
from training.corpus import USER_RELATION

log = logging.getLogger(__name__)

SYSTEMS = ("off", "auto", "retrieval")
N_TOKENS = 32


@dataclass(frozen=True)
class ChatCase:
    family: str  # "trained" | "free" | "heldout" | "general"
    message: str  # the user's message
    subject: str = ""
    answer: str = ""
    bucket: int = 0
    kind: str = "chat"  # "chat": through the chat template; "completion": the text as it is


def sample_rows(rows: Sequence[Any], n: int, rng: np.random.Generator) -> list:
    """At most `n` of `rows`, drawn without replacement by `rng`, kept in their order."""
    return [rows[i] for i in sorted(rng.choice(len(rows), min(n, len(rows)), replace=False))]


def chat_cases(probes: Sequence, general: Sequence[dict] = (), per_family: int = 0, seed: int = 0,
               full_buckets: Sequence[int] = (), validation: bool = False) -> list[ChatCase]:
    """The evaluation's cases from a corpus's probes (one per entity, relations with a chat question only).

    Args:
        general: general prompts ({"text", "kind"}), asked as they are.
        per_family: at most this many trained, free-form and held-out cases each (0: all), drawn seeded.
        full_buckets: popularity buckets whose trained facts are all asked (as chat questions), beside the
            draw from the other buckets (e.g. the rarest, which the targets are about).
        validation: ask in the validation wordings (`chat_forms.VALIDATION_QUESTIONS` / `VALIDATION_FORMS`),
            on which settings are chosen, instead of the test wordings.
    """
    questions, forms = (VALIDATION_QUESTIONS, VALIDATION_FORMS) if validation else (CHAT_QUESTIONS, FREE_FORMS)
    rng = np.random.default_rng(seed)
    firsts: dict[tuple[str, str], Any] = {}
    for p in probes:
        if p.split in ("train", "heldout") and p.relation in questions and p.entity:
            firsts.setdefault((p.split, p.entity), p)

    def draw(rows: list) -> list:
        if per_family and len(rows) > per_family:
            keep = sorted(rng.choice(len(rows), per_family, replace=False).tolist())
            rows = [rows[i] for i in keep]
        return rows

    trained = [p for (s, _), p in firsts.items() if s == "train"]
    heldout = [p for (s, _), p in firsts.items() if s == "heldout"]
    full = [p for p in trained if p.bucket in full_buckets]
    asked = full + draw([p for p in trained if p.bucket not in full_buckets])
    out = [ChatCase("trained", questions[p.relation].format(name=p.entity), p.entity, p.answer, p.bucket)
           for p in asked]
    out += [ChatCase("free", forms[i % len(forms)].format(name=p.entity), p.entity, p.answer, p.bucket)
            for i, p in enumerate(draw(trained))]
    out += [ChatCase("heldout", questions[p.relation].format(name=p.entity), p.entity, p.answer, p.bucket)
            for p in draw(heldout)]
    # a user's own questions (`hiermem build --docs --questions`): asked as they are written
    out += [ChatCase("trained", p.prompt, answer=p.answer, bucket=p.bucket)
            for p in probes if p.relation == USER_RELATION and p.split == "train"]
    out += [ChatCase("general", g["text"], kind=g.get("kind", "completion")) for g in general]
    return out


# ---- scoring a reply ---------------------------------------------------------------------------------------

_WORDS = re.compile(r"\w+", re.UNICODE)


def contains_answer(reply: str, answer: str) -> bool:
    return bool(answer.strip()) and answer.strip().lower() in reply.lower()


def repeats_4gram(reply: str) -> bool:
    """Whether some word 4-gram occurs twice in the reply (lower-cased words)."""
    w = [x.lower() for x in _WORDS.findall(reply)]
    grams = [tuple(w[i:i + 4]) for i in range(len(w) - 3)]
    return len(grams) != len(set(grams))


def names_subject(reply: str, subject: str) -> tuple[bool, bool]:
    """(the reply names the subject, and names it intact): it names it when the full name appears or a word
    shares the name's first four letters ("Amar" for "Amarillo"); intact when the full name appears."""
    if not subject:
        return False, False
    intact = subject.lower() in reply.lower()
    first = _WORDS.findall(subject.lower())
    stem = first[0][:4] if first and len(first[0]) >= 4 else None
    named = intact or (stem is not None and any(w.lower().startswith(stem) for w in _WORDS.findall(reply)))
    return named, intact


def score(case: ChatCase, reply: str) -> dict:
    """The reply's marks; `good`: what a client wants of an answer, in one mark -- the answer contained (where
    the case has one), no repeated 4-gram, and the subject intact if the reply names it."""
    named, intact = names_subject(reply, case.subject)
    contained = contains_answer(reply, case.answer) if case.answer else None
    repeated = repeats_4gram(reply)
    return {"contained": contained, "repeated": repeated, "named": named, "intact": intact,
            "good": contained is not False and not repeated and (intact or not named)}


# ---- generating ------------------------------------------------------------------------------------------


def greedy_replies(model, prompts: Sequence[Sequence[int]], rows: Sequence[Sequence[Hashable]],
                   get_block: Callable[[Hashable], torch.Tensor | None], layers: Sequence[int], eos: set[int],
                   n_tokens: int = N_TOKENS, batch: int = 16) -> list[list[int]]:
    """Greedy replies of up to `n_tokens` (cut at EOS), `batch` prompts decoded together (`lm.generate.
    greedy_decode`), each row with the blocks named by `rows[i]` (empty: the anchor alone)."""
    from lm import MemoryBatch
    from lm.generate import greedy_decode

    def memory_for(idx: list[int]):
        keys = [list(rows[i]) for i in idx]
        return MemoryBatch.from_paths(keys, get_block, layers) if any(keys) else None

    return [d.tokens for d in greedy_decode(model, prompts, n_tokens, eos, memory_for, batch=batch)]


def _prompt_ids(tok, chat_template, case: ChatCase, message: str) -> list[int]:
    if case.kind == "chat" and chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                       tokenize=False)
    else:
        text = message
    return list(tok(text, add_special_tokens=False)["input_ids"])


def chat_eval(model, tok, chat_template, router, embed: Callable[[list[str]], np.ndarray], docs: Sequence[dict],
              get_block: Callable[[Hashable], torch.Tensor | None], layers: Sequence[int],
              cases: Sequence[ChatCase], n_tokens: int = N_TOKENS, batch: int = 16,
              samples: int = 8) -> dict:
    """Replies of every case under `SYSTEMS`, scored (see the module docstring). `router`: the bank's
    DocRouter (None: no memory is ever used, the auto system is the anchor alone). Returns the report
    dict: per family and system the rates, and `samples` sample replies per family side by side."""
    from lm.generate import default_eos_ids
    from training.general_use import top_documents

    t0 = time.perf_counter()
    eos = default_eos_ids(model, tok)
    messages = [c.message for c in cases]
    routes = router.route_texts(messages, embed) if router is not None else [None] * len(cases)
    paths = [tuple(r.path) if r is not None and r.path is not None else () for r in routes]
    top = top_documents(docs, messages, embed, 1)
    retrieved = [f"{docs[int(t[0])]['text']}\n\n{m}" for t, m in zip(top, messages, strict=True)]
    off_ids = [_prompt_ids(tok, chat_template, c, c.message) for c in cases]
    replies: dict[str, list[str]] = {}
    off = greedy_replies(model, off_ids, [()] * len(cases), get_block, layers, eos, n_tokens, batch)
    replies["off"] = [tok.decode(r, skip_special_tokens=True) for r in off]
    # auto: only the cases the gate opened differ from off
    used = [i for i, p in enumerate(paths) if p]
    auto = list(replies["off"])
    got = greedy_replies(model, [off_ids[i] for i in used],
                         [[(lv, int(n)) for lv, n in enumerate(paths[i], start=1)] for i in used],
                         get_block, layers, eos, n_tokens, batch)
    for i, r in zip(used, got, strict=True):
        auto[i] = tok.decode(r, skip_special_tokens=True)
    replies["auto"] = auto
    rag_ids = [_prompt_ids(tok, chat_template, c, m) for c, m in zip(cases, retrieved, strict=True)]
    replies["retrieval"] = [tok.decode(r, skip_special_tokens=True) for r in
                            greedy_replies(model, rag_ids, [()] * len(cases), get_block, layers, eos, n_tokens,
                                           batch)]
    rows = []
    for i, c in enumerate(cases):
        rows.append({**asdict(c), "memory_used": bool(paths[i]), "path": list(paths[i]),
                     **{s: {"reply": replies[s][i], **score(c, replies[s][i])} for s in SYSTEMS}})
    report = summarize_chat(rows, samples)
    report.update({"n_tokens": n_tokens, "seconds": round(time.perf_counter() - t0, 1)})
    report["per_case"] = rows
    return report


def _rate(xs: Sequence[bool | None]) -> float | None:
    vals = [bool(x) for x in xs if x is not None]
    return float(np.mean(vals)) if vals else None


def summarize_chat(rows: Sequence[dict], samples: int = 8) -> dict:
    """Per family (and, for trained facts, per bucket): for each system the share of replies with the answer,
    with a repeated 4-gram, naming the subject intact (of those naming it), unchanged from off; and the
    share of cases given memory."""
    out: dict = {"families": {}, "samples": {}}
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["family"], []).append(r)
        if r["family"] == "trained":
            groups.setdefault(f"trained, bucket {r['bucket']}", []).append(r)
    for name, rs in groups.items():
        fam: dict = {"n": len(rs), "memory_used": _rate([r["memory_used"] for r in rs]), "systems": {}}
        for s in SYSTEMS:
            named = [r for r in rs if r[s]["named"]]
            fam["systems"][s] = {
                "contained": _rate([r[s]["contained"] for r in rs]),
                "repeated": _rate([r[s]["repeated"] for r in rs]),
                "intact": _rate([r[s]["intact"] for r in named]), "n_named": len(named),
                "good": _rate([r[s].get("good") for r in rs]),
                "unchanged": _rate([r[s]["reply"] == r["off"]["reply"] for r in rs])}
        out["families"][name] = fam
        if not name.startswith("trained, bucket"):
            out["samples"][name] = [{"message": r["message"], "memory_used": r["memory_used"],
                                     **{s: r[s]["reply"] for s in SYSTEMS}} for r in rs[:samples]]
    return out


def chat_markdown(report: dict) -> str:
    def pct(x) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    lines = [f"### Chat replies ({report['n_tokens']} greedy tokens through the chat template)", "",
             "| family | n | memory used | system | answer contained | repeated 4-gram | subject intact "
             "(of replies naming it) | good (all three) | unchanged from off |", "|---|---|---|---|---|---|---|---|---|"]
    for name, fam in report["families"].items():
        for s, v in fam["systems"].items():
            lines.append(f"| {name} | {fam['n']} | {pct(fam['memory_used'])} | {s} | {pct(v['contained'])} | "
                         f"{pct(v['repeated'])} | {pct(v['intact'])} (n = {v['n_named']}) | {pct(v.get('good'))} | "
                         f"{pct(v['unchanged'])} |")
    for name, rows in report["samples"].items():
        lines += ["", f"#### Sample replies: {name}", "", "| message | memory | off | auto | retrieval |",
                  "|---|---|---|---|---|"]
        for r in rows:
            cells = [r["message"], "yes" if r["memory_used"] else "no", r["off"], r["auto"], r["retrieval"]]
            lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"
