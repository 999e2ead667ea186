"""`hiermem build --preset demo|docs|facts|...`: corpus -> tree -> train -> export -> eval in one resumable command.

Every stage leaves a marker of completion in the work directory, so a second run (or a run after an
interruption) continues where the first stopped: the corpus is kept, training resumes from its last
checkpoint, a published bank is not written again, and the evaluation is skipped when its report exists.
Stage timings go to `WORK/build.json`; the first run's wall time is the figure bench/longtail.py reports.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    # The bank scripts/run.sh serves: the documents corpus at a fifth of its entities, trained with the same
    # defaults. Sized so that a fresh clone's first run fits 15 minutes on the slowest CPU seen, an AVX2 EPYC in
    # float32 (docs/training.md, "The demo bank"). Its long-tail figures: bench/results/longtail-demo.md; the
    # benchmarks' figures stay on "docs".
    "demo": {
        "corpus": {"style": "documents", "sizes": {"city_country": 40, "us_city_state": 10, "country_capital": 8,
                                                   "element_number": 6},
                   "heldout_fraction": 0.2, "heldout_extra": 0.75},
        "train": {},
    },
    # Airports named by IATA codes (training/corpus_codes.py): a corpus of another shape that no setting was
    # chosen on, trained with the same defaults (the chat evaluation's second corpus, issue 28).
    "airports": {
        "corpus": {"style": "airports", "n_trained": 100, "n_heldout": 50},
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
DOCS_CHAT_GENERAL = 16
"""General prompts asked in chat beside a user's questions (`--docs --questions`): is anything else changed?"""
# `hiermem build` without --preset: the demo bank ($HIERMEM_HOME/banks/demo) that scripts/run.sh serves
DEFAULT_PRESET = "demo"


def build_wall_seconds(status: dict) -> float:
    """The whole build's wall time from its build.json: the first run, plus the evaluation when the first run
    left it out (`--no-eval`, as scripts/run.sh builds the demo bank) and a later run added it."""
    seconds = float(status["first_run_seconds"])
    if not status.get("first_run_evaluated", True):
        seconds += float(status["stages"].get("eval", {}).get("seconds", 0.0))
    return round(seconds, 1)


class StaleWork(ValueError):
    """A preset's work directory holds a build of another corpus."""


def stale_preset_work(preset: str, work: Path) -> str | None:
    """Why `work` holds a build of another corpus than `preset`'s, or None. A build records its preset's corpus
    spec in build.json; a work directory from before that record is judged by its corpus: the `demo` preset
    (a documents corpus, no preserve file) took the name that the facts corpus's preset had until issue 31 renamed it,
    so an old `$HIERMEM_HOME/work/demo` may hold a facts corpus with its preserve file."""
    spec = PRESETS[preset]["corpus"]
    status_file, corpus_dir = Path(work) / "build.json", Path(work) / "corpus"
    if not (corpus_dir / "probes.jsonl").exists():
        return None
    recorded = json.loads(status_file.read_text()).get("preset") if status_file.exists() else None
    if recorded is not None:
        if recorded != {"name": preset, "corpus": spec}:
            return f"it was built from preset {recorded.get('name')!r} with another corpus ({recorded.get('corpus')})"
        return None
    if spec.get("style") == "documents" and not spec.get("preserve_ratio") and (corpus_dir / "preserve.jsonl").exists():
        return "its corpus has a preserve file, which this preset's corpus never has (an older preset of that name)"
    return None


def preset_corpus(spec: dict):
    """The corpus a preset's corpus spec describes (its "style": facts, documents or airports)."""
    spec = dict(spec)
    style = spec.pop("style", "facts")
    if style == "documents":
        from training.corpus_docs import build_documents_corpus

        return build_documents_corpus(**spec)
    if style == "airports":
        from training.corpus_codes import build_airports_corpus

        return build_airports_corpus(**spec)
    from training.corpus import build_facts_corpus

    return build_facts_corpus(**spec)


def check_preset(name: str) -> str:
    """`name` when it is a preset; a ValueError naming the presets otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; the presets are {', '.join(PRESETS)} "
                         f"(facts: the probe-shaped facts corpus; docs: the documents corpus; demo: the bank scripts/run.sh serves; "
                         f"airports: airports named by IATA codes)")
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


def docs_corpus_stage(work: Path, docs: Sequence[str | Path], questions: str | Path | None = None,
                      tokenizer: Any = None) -> dict | None:
    """The corpus stage of `hiermem build --docs`: the user's files (training/ingest.py) as WORK/corpus.

    None when WORK/corpus already holds exactly these passages and questions; otherwise the new corpus's
    summary, with ``job_restarted``. A job trained on other passages (or on a preset's corpus) cannot be
    resumed on these, so when the passages changed the job directory WORK/job is deleted and training starts
    afresh; when only the questions changed, the evaluation report is deleted so that it is made again.
    """
    from training.corpus import corpus_summary
    from training.ingest import read_passages, read_questions, write_docs_corpus

    work = Path(work)
    corpus_dir, fresh = work / "corpus", work / "corpus.new"
    passages = read_passages(docs, tokenizer=tokenizer)
    asked = read_questions(questions) if questions else []
    shutil.rmtree(fresh, ignore_errors=True)
    corpus = write_docs_corpus(passages, fresh, asked)

    def same(name: str) -> bool:
        old = corpus_dir / name
        return old.exists() and old.read_bytes() == (fresh / name).read_bytes()

    if same("docs.jsonl") and same("probes.jsonl") and not (corpus_dir / "preserve.jsonl").exists():
        shutil.rmtree(fresh)
        return None
    restarted = False
    if not same("docs.jsonl"):
        if (corpus_dir / "docs.jsonl").exists():
            log.warning("the passages of %s differ from those %s was built from: rebuilding the corpus",
                        ", ".join(map(str, docs)), corpus_dir)
        if (work / "job").exists():
            log.warning("deleting the stale training job %s: training starts afresh on the new passages",
                        work / "job")
            shutil.rmtree(work / "job")
            restarted = True
    elif (corpus_dir / "probes.jsonl").exists():
        log.info("the questions changed: rewriting %s; the evaluation runs again", corpus_dir / "probes.jsonl")
    (work / "eval" / "longtail.json").unlink(missing_ok=True)
    shutil.rmtree(corpus_dir, ignore_errors=True)
    fresh.replace(corpus_dir)
    return {**corpus_summary(corpus), "sources": len({p["source"] for p in passages}),
            "job_restarted": restarted}


def run_build(preset: str = DEFAULT_PRESET, bank_dir: Path | None = None, work: Path | None = None,
              epochs: int | None = None, evaluate: bool = True, rag: tuple[int, ...] = (),
              train_overrides: dict | None = None, eval_dtype: str = "float32",
              docs: Sequence[str | Path] | None = None, questions: str | Path | None = None,
              chat: int | None = None) -> dict:
    """Build a bank: from `preset`'s corpus, or with `docs` from the user's files and folders (`questions`: a
    JSONL of {"question", "answer"} to evaluate on), trained with `preset`'s settings either way. `chat`: the
    evaluation's chat cases per family (`hiermem eval longtail --chat`; default: none for a preset, the
    general prompts beside a user's questions). Every stage reports on one progress line
    (training/progress.py) unless the training settings turn progress off."""
    from training.progress import build_display

    settings = {**PRESETS[check_preset(preset)]["train"], **(train_overrides or {})}
    with build_display(enabled=bool(settings.get("progress", TrainConfig().progress))):
        return _run_build(preset, bank_dir, work, epochs, evaluate, rag, train_overrides, eval_dtype, docs, questions,
                          chat)


def _run_build(preset: str, bank_dir: Path | None, work: Path | None, epochs: int | None, evaluate: bool,
               rag: tuple[int, ...], train_overrides: dict | None, eval_dtype: str,
               docs: Sequence[str | Path] | None, questions: str | Path | None, chat: int | None) -> dict:
    from training.corpus import Corpus, corpus_summary
    from training.progress import task

    p = PRESETS[check_preset(preset)]
    if questions and not docs:
        raise ValueError("questions come with --docs (a preset's corpus has its own probes)")
    name = (Path(docs[0]).resolve().stem or "files") if docs else preset
    if docs and name in PRESETS:  # a folder named like a preset must not replace that preset's bank
        name += "-files"
    work = Path(work) if work else home() / "work" / name
    bank_dir = Path(bank_dir) if bank_dir else home() / "banks" / name
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
    if not docs and (why := stale_preset_work(preset, work)):
        raise StaleWork(f"work directory {work} does not hold a build of preset {preset!r}: {why}. Move or delete "
                         f"it and the bank built from it ({bank_dir}), or give --work and --out")
    train_settings = {**p["train"], **(train_overrides or {})}
    if docs and not questions:  # the generic memory is only the evaluation's control, and nothing is evaluated
        train_settings.setdefault("generic_prob", 0.0)
    if docs:
        from lm import load_anchor

        log.info("[1/4] corpus of %s -> %s", ", ".join(map(str, docs)), corpus_dir)
        t0 = time.perf_counter()
        anchor = load_anchor(train_settings.get("anchor", TrainConfig().anchor))
        summary = docs_corpus_stage(work, docs, questions, anchor.tokenizer)
        if summary is not None:
            if summary["job_restarted"]:
                status = {"stages": {}}  # timings of the build on the old passages describe nothing now
            stage_done("corpus", time.perf_counter() - t0, **summary)
    elif not (corpus_dir / "probes.jsonl").exists():
        log.info("[1/4] corpus -> %s", corpus_dir)
        t0 = time.perf_counter()
        corpus = preset_corpus(p["corpus"])
        corpus.save(corpus_dir)
        status["preset"] = {"name": preset, "corpus": p["corpus"]}  # stale_preset_work
        stage_done("corpus", time.perf_counter() - t0, **corpus_summary(corpus))
    corpus = Corpus.load(corpus_dir)

    from memory_store.bank import is_version_root

    job = work / "job"
    # a user's bank is a versioned root (`hiermem bank update` publishes its next versions there): the job
    # exports into the work directory and the root's first version is made from that
    fresh_root = bool(docs) and not is_version_root(bank_dir) and not (bank_dir / "manifest.json").exists()
    export_to = work / "export" if fresh_root else bank_dir
    cfg = TrainConfig(corpus=str(corpus_dir), out=str(job), bank=str(export_to), **train_settings)
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
                   **{k: info[k] for k in ("steps", "train_seconds", "bank_id", "tokens_seen", "throughput")
                      if k in info})
    from memory_store import Bank

    if fresh_root and (export_to / "manifest.json").exists():
        from memory_store.ops import init_version_root

        log.info("bank root %s: first version from %s", bank_dir, export_to)
        init_version_root(export_to, bank_dir)
    bank_id = None
    if (bank_dir / "manifest.json").exists() or is_version_root(bank_dir):
        with Bank.open(bank_dir) as bank:
            bank_id = bank.bank_id
    expected = json.loads(job_file.read_text()).get("bank_id")
    if bank_id is None or (expected and bank_id != expected):  # absent, or a bank of another job
        log.info("[3/4] export -> %s (training done in %s)", bank_dir, job)
        from training.export import export_job

        with task("export", 1, "bank", enabled=cfg.progress) as bar:
            bank_id = export_job(job, bank_dir, n_shards=cfg.shards, dtype=cfg.dtype)
            bar.update()
    result = None
    report = work / "eval" / "longtail.json"
    if report.exists():
        result = json.loads(report.read_text())
        if result.get("bank_id") != bank_id or (chat and "chat" not in result):
            result = None  # evaluated another bank, or without the chat replies asked for now: do it again
    if evaluate and result is None and not corpus.probes:
        log.info("[4/4] no questions to ask (give --questions FILE, a JSONL of {\"question\", \"answer\"}): "
                 "the self-check instead, the documents' subjects asked in chat -> %s", report.parent)
        check = work / "eval" / "selfcheck.json"
        if not check.exists() or json.loads(check.read_text()).get("bank_id") != bank_id:
            from training.selfcheck import self_check

            t0 = time.perf_counter()
            self_check(bank_dir, corpus_dir, report.parent)
            stage_done("self-check", time.perf_counter() - t0)
        evaluate = False
    if evaluate and result is None:
        log.info("[4/4] long-tail evaluation -> %s", report.parent)
        from training.evaluate import evaluate_longtail

        t0 = time.perf_counter()
        result = evaluate_longtail(bank_dir, corpus_dir, anchor=cfg.anchor, out_dir=report.parent,
                                   hidden_lookup=job_hidden_lookup(job, corpus.docs), rag=rag, dtype=eval_dtype,
                                   # a user's questions are also asked in chat, beside general prompts
                                   chat=chat if chat is not None else DOCS_CHAT_GENERAL if docs else 0)
        stage_done("eval", time.perf_counter() - t0)
    status["last_run_seconds"] = round(time.perf_counter() - t_all, 1)
    if "first_run_seconds" not in status:  # the whole first run (process start-up aside), or its stages' sum
        fresh = {"corpus", "train+export"} <= ran and ("eval" in ran or not evaluate)
        status["first_run_seconds"] = round(time.perf_counter() - t_all, 1) if fresh else round(
            sum(s["seconds"] for s in status["stages"].values()), 1)
        status["first_run_evaluated"] = "eval" in status["stages"]  # not after --no-eval (scripts/run.sh)
    status["bank"] = str(bank_dir)
    status_file.write_text(json.dumps(status, indent=2) + "\n")
    return {"status": status, "result": result, "bank": str(bank_dir), "work": str(work)}


def run_build_command(args) -> int:
    from training.ingest import IngestError

    docs, questions = getattr(args, "docs", None), getattr(args, "questions", None)
    if questions and not docs:
        raise SystemExit("hiermem build: --questions needs --docs (a preset's corpus has its own probes)")
    try:
        out = run_build(args.preset, Path(args.out) if args.out else None, Path(args.work) if args.work else None,
                        epochs=args.epochs, evaluate=not args.no_eval,
                        train_overrides={"generic_prob": 0.0} if args.no_generic else None,
                        docs=docs, questions=questions)
    except (IngestError, StaleWork) as exc:
        raise SystemExit(f"hiermem build: {exc}") from None
    if out["result"]:
        from training.evaluate import markdown

        print(markdown(out["result"]))
    elif (Path(out["work"]) / "eval" / "selfcheck.md").exists():
        print(f"self-check (no --questions given): {Path(out['work']) / 'eval' / 'selfcheck.md'}")
    print(f"bank: {out['bank']}  (work: {out['work']}, stages: "
          + ", ".join(f"{k} {v['seconds']}s" for k, v in out["status"]["stages"].items()) + ")")
    tp = out["status"]["stages"].get("train+export", {}).get("throughput")
    if tp:  # training/throughput.py
        print(f"training: {tp['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s, {tp['flops_ratio']:.0%} of this machine's "
              f"{tp['compute_dtype']} matmul ({tp['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s)")
    return 0
