"""training/distill.py: context distillation -- prompts, the teacher's targets, and the trainer's KL term."""

from __future__ import annotations

import random

import numpy as np
import torch

from training.chat_forms import CHAT_QUESTIONS, FREE_FORMS
from training.distill import Distillation, distill_prompts, teacher_targets

from .conftest import tiny_config

DOCS = [{"id": "a", "text": "Kisumu is a city in Kenya. About 600,000 people live in Kisumu."},
        {"id": "b", "text": "Osmium has the atomic number 76. Its symbol is Os."}]


def test_prompts_ask_about_the_subject_without_the_test_wordings():
    prompts = distill_prompts(DOCS, ["Kisumu", None], chat_per_doc=2, text_per_doc=2)
    chats = [p for p in prompts if p.kind == "chat"]
    texts = [p for p in prompts if p.kind == "text"]
    assert len(chats) == 2 and all(p.doc == 0 and "Kisumu" in p.prompt for p in chats)
    # the document's own sentences, cut right after the subject's name (not "About 600,000 people live in
    # Kisumu", which ends there); a document without a subject gets none
    assert [p.prompt for p in texts] == ["Kisumu"] and texts[0].doc == 0
    test_forms = [f.split("{name}")[0] for f in (*CHAT_QUESTIONS.values(), *FREE_FORMS)]
    assert not any(p.prompt.startswith(f) for p in chats for f in test_forms if f)


def test_the_teachers_targets_follow_its_greedy_continuation_with_the_document_in_context():
    from lm import load_anchor

    a = load_anchor("tiny")
    prompts = distill_prompts(DOCS, ["Kisumu", "Osmium"])
    rows = teacher_targets(a.model, a.tokenizer, None, DOCS, prompts, n_tokens=5, top_k=4)
    for p, r in zip(prompts, rows, strict=True):
        if r is None:  # the random tiny teacher looped
            continue
        student = a.tokenizer(p.prompt, add_special_tokens=False)["input_ids"]
        assert r["ids"][:len(student)] == student and r["start"] == len(student) - 1  # no document text
        cont = r["ids"][len(student):]
        assert r["top_ids"].shape == (len(r["top_logp"]), 4) and len(cont) <= len(r["top_ids"]) <= 5
        assert len(r["top_ids"]) <= len(cont) + 1
        assert r["top_ids"][:len(cont), 0].tolist() == cont  # each position's top-1 is the next token
        assert bool((r["top_logp"][:, :-1] >= r["top_logp"][:, 1:]).all())


def test_training_with_distillation_lowers_its_kl_through_the_documents_paths(docs_corpus, tmp_path):
    from training.trainer import Trainer

    cfg = tiny_config(docs_corpus, tmp_path / "job", epochs=3, distill_weight=1.0, distill_batch=4,
                      distill_tokens=6, routing="docs", batch_size=4, lr=3e-2)
    t = Trainer(cfg)
    t.build_prefix_cache()
    teach = t.distillation
    assert isinstance(teach, Distillation)
    teach.build()
    assert teach.ready and (tmp_path / "job" / "distill.pt").exists()
    rows = list(range(len(teach.data["rows"])))
    with torch.no_grad():
        before = float(teach.loss(rows))
    info = t._loop()
    with torch.no_grad():
        after = float(teach.loss(rows))
    assert info["done"] and after < before
    # a row trains only its own document's path: another leaf's blocks get no gradient from it
    t.opt.zero_grad(set_to_none=True)
    teach.loss([0]).backward()
    path = tuple(int(x) for x in t.paths[teach.data["docs"][0]])
    grads = {k for k, v in t.memory.nodes.items() if v.grad is not None and v.grad.abs().sum() > 0}
    assert grads and grads <= {f"{lv}_{i}" for lv, i in enumerate(path, start=1)}


def test_rows_of_the_steps_documents_come_first():
    from training.data import Batch

    d = Distillation.__new__(Distillation)
    d.data = {"docs": [0, 0, 1, 2], "by_doc": {0: [0, 1], 1: [2], 2: [3]}}
    d.doc_paths, d.rng, d.per_step = np.array([[0, 0], [0, 0], [1, 2]]), random.Random(0), 3
    rows = d.rows_for(Batch([0], [(0, 0)]), doc_of=[0, 1, 2])
    assert sorted(rows[:2]) == [0, 1] and rows[2] == 2  # then a document on the same leaf
