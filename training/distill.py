"""Context distillation: the blocks learn to make the anchor behave as if it had read the document.

The teacher is the frozen anchor with a document in its context; the student is the same anchor without the
document but with the blocks of the document's path. On prompts about the document's subject the student is
trained to match the teacher's next-token distributions along the teacher's own greedy continuation (KL on
the teacher's top-k, renormalised), so the blocks learn what the model would *say* having read the document
-- a chat answer in the model's own words -- rather than to continue the document's text in its order.
This follows Padmanabhan et al., "Propagating Knowledge Updates to LMs Through Distillation" (NeurIPS 2023:
teacher with the entity's definition in context, student learns from its distributions on continuations);
the document's next-token loss stays beside it as a term (docs/training.md, "Context distillation").

Prompts per document (`distill_prompts`), none written for a corpus:

* chat turns: a question or request about the document's subject (`chat_forms.CALIBRATION_FORMS`, the
  subject as `training.views.subject_names` finds it), through the anchor's chat template; the teacher's
  user message holds the document, then the question;
* plain text: a sentence of the document that names the subject, cut right after the name (the
  document's own prefix); the teacher reads the document, a blank line, then the same prefix, and its
  continuation is kept to the end of that sentence.

A teacher continuation that repeats a word 4-gram is dropped (a loop is nothing to learn from).

Everything the teacher gives is computed once per job (the anchor is frozen) and kept in ``distill.pt``.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.chat_eval import repeats_4gram
from training.data import Batch, atomic_save, pad_hidden
from training.prefix import prefix_hidden
from training.progress import task

log = logging.getLogger(__name__)

_SENTENCE_END = re.compile(r"[.!?](\s|$)")


@dataclass(frozen=True)
class DistillPrompt:
    doc: int  # index of the document (its path is the row's path)
    kind: str  # "chat" | "text"
    prompt: str  # the student's user message (chat) or text prefix (text)


def distill_prompts(docs: Sequence[dict], names: Sequence[str | None], chat_per_doc: int = 1,
                    text_per_doc: int = 1, seed: int = 0) -> list[DistillPrompt]:
    """The prompts of every document with a subject (see the module docstring), seeded. A text prompt is a
    sentence of the document that names the subject, cut right after the name ("Desenzano del Garda" ->
    " is a city in Italy."): a prefix that does not name it ("The city is") has no answer without the
    document, and its teacher loops or guesses."""
    from memory_store.router import sentences
    from training.chat_forms import CALIBRATION_FORMS

    rng = random.Random(seed * 13 + 5)
    out: list[DistillPrompt] = []
    for i, (d, name) in enumerate(zip(docs, names, strict=True)):
        if not name:
            continue
        for f in rng.sample(CALIBRATION_FORMS, min(chat_per_doc, len(CALIBRATION_FORMS))):
            out.append(DistillPrompt(i, "chat", f.format(name=name)))
        cuts = [s[:s.index(name) + len(name)] for s in sentences(d["text"])
                if name in s and len(s[s.index(name) + len(name):].split()) >= 2]
        for cut in rng.sample(cuts, min(text_per_doc, len(cuts))):
            out.append(DistillPrompt(i, "text", cut))
    return out


def _render(tok, chat_template: str | None, p: DistillPrompt, document: str | None) -> str:
    """The student's text (`document` None) or the teacher's (the document in context)."""
    if p.kind == "chat" and chat_template:
        content = p.prompt if document is None else f"{document}\n\n{p.prompt}"
        return tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                       tokenize=False)
    return p.prompt if document is None else f"{document}\n\n{p.prompt}"


@torch.no_grad()
def teacher_targets(model, tok, chat_template: str | None, docs: Sequence[dict], prompts: Sequence[DistillPrompt],
                    n_tokens: int, top_k: int, batch: int = 16, progress: bool = False) -> list[dict | None]:
    """Per prompt: the student's token ids (prompt + the teacher's greedy continuation, cut at EOS, and for
    a text prefix at the end of its sentence), where the continuation starts, and the teacher's top-k token
    ids and log-probabilities at each continuation position (the distributions the student is held to).
    None where the continuation repeats a word 4-gram."""
    from lm.generate import default_eos_ids, greedy_decode

    eos = default_eos_ids(model, tok)
    t_ids = [tok(_render(tok, chat_template, p, docs[p.doc]["text"]), add_special_tokens=False)["input_ids"]
             for p in prompts]
    with task("distillation teacher", len(t_ids), "prompt", enabled=progress) as bar:
        decoded = greedy_decode(model, t_ids, n_tokens, eos, top_k=top_k, batch=batch, on_batch=bar.update)
    out: list[dict | None] = []
    for p, d in zip(prompts, decoded, strict=True):
        cont = d.tokens
        n = len(d.top_ids)  # positions scored: one per continuation token, plus the EOS position if reached
        if p.kind == "text":  # the sentence's own ending, not what the teacher says after it
            n = next((k + 1 for k in range(len(cont)) if _SENTENCE_END.search(tok.decode(cont[:k + 1]))), n)
        if repeats_4gram(tok.decode(cont[:n])):
            out.append(None)  # a looping teacher is nothing to learn from
            continue
        student = tok(_render(tok, chat_template, p, None), add_special_tokens=False)["input_ids"]
        out.append({"ids": list(student) + cont[:n], "start": len(student) - 1,
                    "top_ids": torch.stack(d.top_ids[:n]).to(torch.int32),
                    "top_logp": torch.stack(d.top_logp[:n]).to(torch.float16)})
    return out


class Distillation:
    """The distillation rows of one training job: prompts, the teacher's targets and the students' prefix
    states (entering `layer`, the first memory layer; kept in `cache_file`), and the loss.

    Args:
        doc_paths: every document's path; a row trains through its document's path.
        memory_for: paths -> the `lm.MemoryBatch` of the tree's blocks on those paths.
        autocast: a new context for each training forward (`training.compute.Compute.autocast`).
        rng: the job's random stream.
        per_step: rows per step (``--distill-batch``).
    """

    def __init__(self, docs: Sequence[dict], names: Sequence[str | None], doc_paths: np.ndarray, *, model,
                 tokenizer, chat_template: str | None, layer: int,
                 memory_for: Callable[[list[tuple[int, ...]]], Any],
                 autocast: Callable[[], AbstractContextManager], rng: random.Random, per_step: int,
                 cache_file: Path, n_tokens: int = 24, top_k: int = 32, seed: int = 0) -> None:
        self.docs, self.names, self.doc_paths = docs, names, doc_paths
        self.model, self.tokenizer, self.chat_template, self.layer = model, tokenizer, chat_template, layer
        self.memory_for, self.autocast, self.rng, self.per_step = memory_for, autocast, rng, per_step
        self.cache_file, self.n_tokens, self.top_k, self.seed = cache_file, n_tokens, top_k, seed
        self.data: dict[str, Any] | None = None

    @property
    def ready(self) -> bool:
        return self.data is not None and len(self.data["rows"]) > 0

    def build(self, progress: bool = False) -> None:
        if self.cache_file.exists():
            self.data = torch.load(self.cache_file, weights_only=False)
            return
        t0 = time.perf_counter()
        prompts = distill_prompts(self.docs, self.names, seed=self.seed)
        got = teacher_targets(self.model, self.tokenizer, self.chat_template, self.docs, prompts, self.n_tokens,
                              self.top_k, progress=progress)
        prompts = [p for p, r in zip(prompts, got, strict=True) if r is not None]
        rows = [r for r in got if r is not None]
        hidden = prefix_hidden(self.model, [r["ids"] for r in rows], self.layer, progress=progress)
        by_doc: dict[int, list[int]] = {}
        for k, p in enumerate(prompts):
            by_doc.setdefault(p.doc, []).append(k)
        self.data = {"rows": rows, "hidden": hidden, "docs": [p.doc for p in prompts], "by_doc": by_doc,
                     "prompts": [(p.kind, p.prompt) for p in prompts]}
        atomic_save(self.data, self.cache_file)
        log.info("distillation targets for %d prompts of %d documents in %.1fs", len(rows), len(by_doc),
                 time.perf_counter() - t0)

    def rows_for(self, batch: Batch, doc_of: Sequence[int]) -> list[int]:
        """Rows of the batch's documents (`doc_of[i]`: the document training sequence i comes from), then of
        any document on the batch's leaves, `per_step` at most."""
        if self.data is None:
            raise RuntimeError("no distillation targets: build() has not run")
        mine = {doc_of[i] for i in batch.doc_index}
        rows = [k for d in mine for k in self.data["by_doc"].get(d, [])]
        self.rng.shuffle(rows)
        if len(rows) < self.per_step:
            leaves = set(batch.paths)
            more = [k for k, d in enumerate(self.data["docs"])
                    if d not in mine and tuple(int(x) for x in self.doc_paths[d]) in leaves]
            self.rng.shuffle(more)
            rows += more
        return rows[:self.per_step]

    def loss(self, rows: list[int]) -> torch.Tensor:
        """Mean over the rows' continuation positions of KL(teacher || student), the teacher's top-k
        renormalised, the student through its document's path."""
        if self.data is None:
            raise RuntimeError("no distillation targets: build() has not run")
        data = [self.data["rows"][k] for k in rows]
        hs = [self.data["hidden"][k] for k in rows]
        select = torch.zeros(len(rows), max(h.shape[0] for h in hs), dtype=torch.bool)
        for b, r in enumerate(data):
            select[b, r["start"]:r["start"] + len(r["top_ids"])] = True
        paths = [tuple(int(x) for x in self.doc_paths[self.data["docs"][k]]) for k in rows]
        memory = self.memory_for(paths)
        with self.autocast():
            logits = self.model.forward_from(pad_hidden(hs), self.layer, memory=memory, select=select)  # (N, V)
        logp = torch.log_softmax(logits.float(), -1)
        top_ids = torch.cat([r["top_ids"] for r in data]).long()  # (N, k)
        t_logp = torch.cat([r["top_logp"] for r in data]).float()
        t_logp = t_logp - torch.logsumexp(t_logp, -1, keepdim=True)  # the top-k renormalised
        s_logp = logp.gather(1, top_ids)
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
