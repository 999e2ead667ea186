"""`hiermem build --preset docs|facts|...`: corpus -> tree -> train -> export -> eval in one resumable command.

Every stage leaves a marker of completion in the work directory, so a second run (or a run after an
interruption) continues where the first stopped: the corpus is kept, training resumes from its last
checkpoint, a published bank is not written again, and the evaluation is skipped when its report exists.
Stage timings go to `WORK/build.json`; the first run's wall time is the figure bench/longtail.py reports.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from base.paths import home
from training.config import TrainConfig

log = logging.getLogger(__name__)

PRESETS: dict[str, dict] = {
    # SmolLM2-135M, a 2-level 8 x 8 tree, memory in the last 2 layers; fetched path = 2 x 3 x 96 x 576 =
    # 0.33M parameters, bank = 2 x 3 x (8 x 64 + 64 x 32) x 576 = 8.8M. About 400 facts over the four
    # relations (rank-stratified, so every popularity bucket is there), 20% of them held out: sized so the
    # first run fits in about 20 minutes on 2 shared CPU cores (see docs/training.md for the figures).
    "facts": {
        "corpus": {"sizes": {"city_country": 240, "us_city_state": 60, "country_capital": 60,
                             "element_number": 40}, "heldout_fraction": 0.2,
                   # 600 preserve prompts (3 per trained fact, ~9 per leaf: 200 left leaves bare), and
                   # 288 extra held-out facts (368 in all) so the breakage figure rests on ~100 known facts
                   "preserve_ratio": 1.5, "heldout_extra": 0.75},
        "train": {"anchor": "smollm2", "branching": [8, 8], "ranks": [64, 32], "mem_layers": 2,
                  "epochs": 16, "batch_size": 32, "lr": 1e-2, "warmup_steps": 5, "loss": "continuation",
                  "preserve_weight": 1.0, "preserve_batch": 32, "skip_name_targets": False},
    },
    # A corpus as a user brings it: paragraphs about each entity in several wordings, no route_text, no
    # preserve file; probes in wordings no document uses. Nearest-document routing with a calibrated gate.
    "docs": {
        "corpus": {"style": "documents", "sizes": {"city_country": 200, "us_city_state": 50,
                                                   "country_capital": 40, "element_number": 30},
                   "heldout_fraction": 0.2, "heldout_extra": 0.75},
        # `hiermem train`'s defaults (TrainConfig), which were chosen on this corpus's `valid` wordings
        "train": {},
    },
    # The facts corpus with its preserve file removed: the same pipeline as "docs" (document router, gate,
    # derived preservation) on single-sentence documents, for comparison with the facts preset.
    "facts-nopreserve": {
        "corpus": {"sizes": {"city_country": 240, "us_city_state": 60, "country_capital": 60,
                             "element_number": 40}, "heldout_fraction": 0.2, "preserve_ratio": 0.0,
                   "heldout_extra": 0.75},
        "train": {"anchor": "smollm2", "branching": [8, 8], "ranks": [64, 32], "mem_layers": 2,
                  "epochs": 16, "batch_size": 32, "lr": 1e-2, "warmup_steps": 5, "loss": "continuation",
                  "preserve_weight": 1.0, "preserve_batch": 32, "preserve_per_doc": 1, "skip_name_targets": False,
                  "routing": "docs"},
    },
    # the tiny random anchor: exercises every stage in seconds (tests)
    "tiny": {
        "corpus": {"sizes": {"city_country": 16, "us_city_state": 6, "country_capital": 6,
                             "element_number": 6}, "heldout_fraction": 0.2},
        "train": {"anchor": "tiny", "embedder": "hash-trigram", "branching": [2, 2], "ranks": [8, 4],
                  "mem_layers": 2, "epochs": 2, "batch_size": 8, "lr": 1e-2, "warmup_steps": 1,
                  "loss": "continuation", "preserve_weight": 1.0, "preserve_batch": 16, "skip_name_targets": False},
    },
}
# `hiermem build` without --preset: the documents corpus, whose bank ($HIERMEM_HOME/banks/docs) is the demo
# bank scripts/run.sh serves
DEFAULT_PRESET = "docs"


def check_preset(name: str) -> str:
    """`name` when it is a preset; a ValueError naming the presets otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; the presets are {', '.join(PRESETS)} "
                         f"(facts: the probe-shaped facts corpus; docs: the demo bank)")
    return name


def job_hidden_lookup(job_dir: Path, corpus_docs: list[dict]):
    """Prefix states of trained facts taken from the training job's prefix cache: a trained probe's
    prompt + answer is a prefix of its document's tokens, so causal attention makes its states a slice."""
    import torch

    f = Path(job_dir) / "prefix-rank0.pt"
    cache = torch.load(f) if f.exists() else None
    index = {d["id"]: i for i, d in enumerate(corpus_docs)}

    def lookup(items, layer):
        from lm import load_anchor

        out = [None] * len(items)
        job = json.loads((Path(job_dir) / "job.json").read_text())
        # the cache holds the residual stream entering the job's first memory layer, and no other layer's
        if cache is None or len(cache) != len(corpus_docs) or layer != min(job["memory_layers"]):
            return out
        tok = load_anchor(job["anchor"]).tokenizer
        for k, it in enumerate(items):
            i = index.get(it.probe.doc_id)
            if i is None:
                continue
            doc_ids = tok(corpus_docs[i]["text"], add_special_tokens=False)["input_ids"]
            if doc_ids[:len(it.ids)] == it.ids and cache[i].shape[0] >= len(it.ids):
                out[k] = cache[i][:len(it.ids)]
        return out

    return lookup


def run_build(preset: str = DEFAULT_PRESET, bank_dir: Path | None = None, work: Path | None = None,
              epochs: int | None = None, evaluate: bool = True, rag: tuple[int, ...] = (),
              train_overrides: dict | None = None, eval_dtype: str = "float32") -> dict:
    from training.corpus import Corpus, build_facts_corpus, corpus_summary

    p = PRESETS[check_preset(preset)]
    work = Path(work) if work else home() / "work" / preset
    bank_dir = Path(bank_dir) if bank_dir else home() / "banks" / preset
    work.mkdir(parents=True, exist_ok=True)
    status_file = work / "build.json"
    status = json.loads(status_file.read_text()) if status_file.exists() else {"stages": {}}
    t_all = time.perf_counter()

    ran: set[str] = set()

    def stage_done(name: str, seconds: float, **extra) -> None:
        ran.add(name)
        status["stages"][name] = {"seconds": round(seconds, 1), "loadavg_1m_at_end": os.getloadavg()[0],
                                  **extra}
        status_file.write_text(json.dumps(status, indent=2) + "\n")

    corpus_dir = work / "corpus"
    if not (corpus_dir / "probes.jsonl").exists():
        log.info("[1/4] corpus -> %s", corpus_dir)
        t0 = time.perf_counter()
        spec = dict(p["corpus"])
        if spec.pop("style", "facts") == "documents":
            from training.corpus_docs import build_documents_corpus

            corpus = build_documents_corpus(**spec)
        else:
            corpus = build_facts_corpus(**spec)
        corpus.save(corpus_dir)
        stage_done("corpus", time.perf_counter() - t0, **corpus_summary(corpus))
    corpus = Corpus.load(corpus_dir)

    job = work / "job"
    cfg = TrainConfig(corpus=str(corpus_dir), out=str(job), bank=str(bank_dir),
                      **{**p["train"], **(train_overrides or {})})
    if epochs:
        cfg.epochs = epochs
    job_file = job / "job.json"
    job_done = job_file.exists() and json.loads(job_file.read_text()).get("done")
    if not job_done:
        log.info("[2/4] tree + training (%d epochs) -> %s, then [3/4] export -> %s", cfg.epochs, job, bank_dir)
        from training.trainer import train

        t0 = time.perf_counter()
        info = train(cfg)
        # the config as the trainer resolved it (the memory layers it chose when the preset names none)
        config = {**cfg.model_dump(), "memory_layers": info.get("memory_layers", cfg.memory_layers)}
        stage_done("train+export", time.perf_counter() - t0, config=config,
                   **{k: info[k] for k in ("steps", "train_seconds", "bank_id", "tokens_seen") if k in info})
    from memory_store import Bank

    bank_id = None
    if (bank_dir / "manifest.json").exists():
        with Bank.open(bank_dir) as bank:
            bank_id = bank.bank_id
    expected = json.loads(job_file.read_text()).get("bank_id")
    if bank_id is None or (expected and bank_id != expected):  # absent, or a bank of another job
        log.info("[3/4] export -> %s (training done in %s)", bank_dir, job)
        from training.export import export_job

        bank_id = export_job(job, bank_dir, n_shards=cfg.shards, dtype=cfg.dtype)
    result = None
    report = work / "eval" / "longtail.json"
    if report.exists():
        result = json.loads(report.read_text())
        if result.get("bank_id") != bank_id:
            result = None  # evaluated another bank: do it again
    if evaluate and result is None:
        log.info("[4/4] long-tail evaluation -> %s", report.parent)
        from training.evaluate import evaluate_longtail

        t0 = time.perf_counter()
        result = evaluate_longtail(bank_dir, corpus_dir, anchor=cfg.anchor, out_dir=report.parent,
                                   hidden_lookup=job_hidden_lookup(job, corpus.docs), rag=rag, dtype=eval_dtype)
        stage_done("eval", time.perf_counter() - t0)
    status["last_run_seconds"] = round(time.perf_counter() - t_all, 1)
    if "first_run_seconds" not in status:  # the whole first run (process start-up aside), or its stages' sum
        fresh = {"corpus", "train+export"} <= ran and ("eval" in ran or not evaluate)
        status["first_run_seconds"] = round(time.perf_counter() - t_all, 1) if fresh else round(
            sum(s["seconds"] for s in status["stages"].values()), 1)
    status["bank"] = str(bank_dir)
    status_file.write_text(json.dumps(status, indent=2) + "\n")
    return {"status": status, "result": result, "bank": str(bank_dir), "work": str(work)}


def run_build_command(args) -> int:
    out = run_build(args.preset, Path(args.out) if args.out else None, Path(args.work) if args.work else None,
                    epochs=args.epochs, evaluate=not args.no_eval,
                    train_overrides={"generic_prob": 0.0} if args.no_generic else None)
    if out["result"]:
        from training.evaluate import markdown

        print(markdown(out["result"]))
    print(f"bank: {out['bank']}  (work: {out['work']}, stages: "
          + ", ".join(f"{k} {v['seconds']}s" for k, v in out["status"]["stages"].items()) + ")")
    return 0
