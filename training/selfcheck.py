"""The build's own check of a bank when the user gave no questions (`hiermem build --docs` without
`--questions`).

Without answers nothing can say whether a fact comes out right. What can be measured is what a user would
see first: asked about the documents' subjects in generic requests ("Tell me about X.", "Write one sentence
about X."; training/chat_forms.py's free forms, never used in calibration or training), does the memory
open, do the replies loop (a repeated word 4-gram), is the subject's name intact where a reply names it; and
asked general prompts, is every reply unchanged from memory off. Memory off, memory auto and the top
retrieved document in context are asked side by side (training/chat_eval.py); the report goes to
WORK/eval/selfcheck.{json,md}.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FORMS = (0, 3)
"""The free forms asked (indices into chat_forms.FREE_FORMS): the two that fit any kind of subject."""


def self_check(bank_dir: Path, corpus_dir: Path, out_dir: Path, subjects: int = 40, general: int = 16,
               seed: int = 0) -> dict:
    """Ask `subjects` of the documents' subjects (drawn seeded) and `general` general prompts; write and return
    the chat report."""
    from lm import load_anchor
    from memory_store import Bank
    from memory_store.router import DocRouter
    from training.chat_eval import ChatCase, chat_eval, chat_markdown, sample_rows
    from training.chat_forms import FREE_FORMS
    from training.corpus import Corpus
    from training.corpus_docs import load_general_prompts
    from training.evaluate import BlockSource, resolve_anchor
    from training.routing import embed, get_embedder
    from training.views import subject_names

    rng = np.random.default_rng(seed)
    corpus = Corpus.load(corpus_dir)
    names = list(dict.fromkeys(n for n in subject_names(corpus.docs) if n))
    names = sample_rows(names, subjects, rng)
    prompts = sample_rows(load_general_prompts("eval"), general, rng)
    cases = [ChatCase("free", FREE_FORMS[FORMS[i % len(FORMS)]].format(name=n), subject=n) for i, n in enumerate(names)]
    cases += [ChatCase("general", g["text"], kind=g.get("kind", "completion")) for g in prompts]
    with Bank.open(bank_dir) as bank:
        anchor = load_anchor(resolve_anchor(bank.anchor))
        embedder = get_embedder(bank.spec.embedder_name)
        report = chat_eval(anchor.model, anchor.tokenizer, anchor.chat_template, DocRouter.load(bank.dir),
                           lambda xs: embed(xs, embedder), corpus.docs,
                           cast("Callable[[Hashable], torch.Tensor | None]", BlockSource(bank).block),
                           list(bank.spec.memory_layers), cases)
        report["bank_id"] = bank.bank_id
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "selfcheck.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    md = ("# Self-check (no questions given)\n\nThe documents' subjects asked in generic requests, and general "
          "prompts; memory off / auto / the top document in context (training/selfcheck.py).\n\n" + chat_markdown(report))
    (out_dir / "selfcheck.md").write_text(md)
    log.info("self-check: %s", out_dir / "selfcheck.md")
    return report
