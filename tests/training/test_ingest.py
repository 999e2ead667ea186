"""A user's files as a corpus (training/ingest.py) and `hiermem build --docs`'s corpus stage: no model is loaded
(passages are measured in characters here)."""

from __future__ import annotations

import json
import logging

import pytest

from training.corpus import Corpus
from training.ingest import IngestError, read_passages, read_questions, write_docs_corpus
from training.pipeline import docs_corpus_stage

LONG_MD = "# Guide\n\n" + "\n\n".join(
    f"## Part {i}\n\n" + " ".join(f"Sentence {j} of part {i} tells the reader something useful." for j in range(25))
    for i in range(3))


def make_folder(tmp_path):
    root = tmp_path / "notes"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "a.txt").write_text("Ada Lovelace wrote the first program.\n\nShe  worked with\tBabbage.\n")
    (root / "sub" / "b.md").write_text("# Engines\n\nThe Analytical Engine was never built.\n")
    (root / "c.jsonl").write_text(json.dumps({"text": "The engine used punched cards.", "id": "cards",
                                              "lang": "en"}) + "\n\n"
                                  + json.dumps({"text": "Babbage designed the Difference Engine."}) + "\n")
    (root / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (root / ".hidden.txt").write_text("not read")
    (root / ".git" / "x.txt").write_text("not read either")
    return root


def test_a_folder_becomes_passages_with_stable_ids(tmp_path, caplog):
    root = make_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="training.ingest"):
        first = read_passages([root])
    assert "d.png" in caplog.text
    assert [p["source"] for p in first] == ["notes/a.txt", "notes/c.jsonl", "notes/c.jsonl", "notes/sub/b.md"]
    assert first[0]["text"] == "Ada Lovelace wrote the first program. She worked with Babbage."
    assert first[0]["id"].startswith("notes/a.txt#0-")
    assert first[1] == {"id": "cards", "text": "The engine used punched cards.", "source": "notes/c.jsonl",
                        "meta": {"lang": "en"}}
    assert first[2]["id"].startswith("notes/c.jsonl#1-") and "meta" not in first[2]
    assert first[3]["text"] == "# Engines The Analytical Engine was never built."
    assert not any("not read" in p["text"] for p in first)
    assert read_passages([root]) == first
    (root / "a.txt").write_text("Ada Lovelace wrote the first published program.\n")
    changed = read_passages([root])
    assert changed[0]["id"] != first[0]["id"] and changed[1:] == first[1:]


def test_a_named_file_is_its_own_source(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("Just one passage.")
    [p] = read_passages([str(f)])
    assert p["source"] == "one.txt" and p["id"].startswith("one.txt#0-")


def test_long_markdown_is_split_within_capacity(tmp_path):
    f = tmp_path / "guide.md"
    f.write_text(LONG_MD)
    passages = read_passages([f], max_tokens=60)  # no tokenizer: 4 characters a token
    assert len(passages) > 3
    assert all(0 < len(p["text"]) <= 240 for p in passages)
    assert passages[0]["text"].startswith("# Guide ## Part 0 Sentence 0")  # headings open their section
    assert not any(p["text"].lstrip("# ").startswith("Part") and "Sentence" not in p["text"] for p in passages)
    assert len({p["id"] for p in passages}) == len(passages)


def test_a_tokenizer_measures_passages_in_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.enable_truncation(8)  # the splitter must count past it, and the tokenizer keep it

    class Fast:  # what the splitter reads of a transformers fast tokenizer
        backend_tokenizer = backend

    f = tmp_path / "guide.md"
    f.write_text(LONG_MD)
    passages = read_passages([f], tokenizer=Fast(), max_tokens=40)
    assert backend.truncation is not None
    backend.no_truncation()
    sizes = [len(backend.encode(p["text"]).ids) for p in passages]
    assert max(sizes) <= 40 and sum(s >= 20 for s in sizes) >= len(sizes) - 3


def test_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(IngestError, match="missing.txt: no such file"):
        read_passages([tmp_path / "missing.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="no passages"):
        read_passages([tmp_path / "empty"])
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG")
    with pytest.raises(IngestError, match=r"x.png: unsupported file type '.png'"):
        read_passages([png])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": oops}\n')
    with pytest.raises(IngestError, match=r"bad.jsonl:3: not valid JSON"):
        read_passages([bad])
    bad.write_text('{"id": "x"}\n')
    with pytest.raises(IngestError, match=r"bad.jsonl:1: .*\"text\""):
        read_passages([bad])
    latin = tmp_path / "latin.txt"
    latin.write_bytes("line one\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(IngestError, match=r"latin.txt:2: not UTF-8"):
        read_passages([latin])


def test_duplicate_ids_are_refused(tmp_path):
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"text": "one", "id": "a"}\n{"text": "two", "id": "a"}\n')
    with pytest.raises(IngestError, match=r"dup.jsonl:2: id 'a' is already used on line 1"):
        read_passages([dup])
    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "three", "id": "a"}\n')
    dup.write_text('{"text": "one", "id": "a"}\n')
    with pytest.raises(IngestError, match=r"'a' is given twice: by dup.jsonl and by other.jsonl"):
        read_passages([dup, other])
    with pytest.raises(IngestError, match="given twice"):  # the same file named twice
        read_passages([dup, dup])


def test_questions_become_probes(tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text('{"question": "Who wrote the first program?", "answer": "Ada Lovelace "}\n')
    questions = read_questions(q)
    corpus = write_docs_corpus([{"id": "p", "text": "Ada wrote it.", "source": "a.txt"}], tmp_path / "c", questions)
    loaded = Corpus.load(tmp_path / "c")
    assert loaded.docs == corpus.docs == [{"id": "p", "text": "Ada wrote it.", "source": "a.txt"}]
    [probe] = loaded.probes
    assert (probe.prompt, probe.answer, probe.bucket, probe.relation, probe.split, probe.template) == (
        "Who wrote the first program?", " Ada Lovelace", 1, "user", "train", "user")
    q.write_text('{"question": "Who?", "answer": "Ada"}\n{"question": "When?", "answer": "  "}\n')
    with pytest.raises(IngestError, match=r"q.jsonl:2: .*'answer'"):
        read_questions(q)


def test_the_build_corpus_stage_rebuilds_when_the_files_change(tmp_path):
    root = make_folder(tmp_path)
    q = tmp_path / "q.jsonl"
    q.write_text('{"question": "Who wrote the first program?", "answer": "Ada Lovelace"}\n')
    work = tmp_path / "work"
    summary = docs_corpus_stage(work, [root], q)
    assert summary is not None and summary["docs"] == 4 and summary["probes"] == 1
    assert summary["job_restarted"] is False
    rows = [json.loads(line) for line in (work / "corpus" / "docs.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [p["id"] for p in read_passages([root])]
    assert all({"id", "text", "source"} <= set(r) for r in rows)
    probes = [json.loads(line) for line in (work / "corpus" / "probes.jsonl").read_text().splitlines()]
    assert probes[0]["prompt"] == "Who wrote the first program?" and probes[0]["answer"] == " Ada Lovelace"

    (work / "job").mkdir()
    (work / "job" / "job.json").write_text("{}")
    assert docs_corpus_stage(work, [root], q) is None  # unchanged: the job resumes
    assert (work / "job" / "job.json").exists()
    (root / "sub" / "b.md").write_text("# Engines\n\nThe Analytical Engine was designed in 1837.\n")
    summary = docs_corpus_stage(work, [root], q)
    assert summary is not None and summary["job_restarted"] is True
    assert not (work / "job").exists() and not (work / "corpus.new").exists()
    assert "1837" in (work / "corpus" / "docs.jsonl").read_text()
    assert docs_corpus_stage(work, [root]) is not None  # the questions are gone: rewritten, job kept
    assert Corpus.load(work / "corpus").probes == []


def test_build_parses_docs_and_questions():
    from hiermem.cli import build_parser

    args = build_parser().parse_args(["build", "--docs", "a", "b", "--questions", "q.jsonl"])
    # the default preset's training settings (hiermem train's defaults, as every documents preset's)
    assert args.docs == ["a", "b"] and args.questions == "q.jsonl" and args.preset == "demo"
    args = build_parser().parse_args(["build", "--preset", "tiny", "--docs", "notes"])
    assert args.docs == ["notes"] and args.preset == "tiny" and args.questions is None
    assert build_parser().parse_args(["build"]).docs is None


def test_a_folder_builds_into_a_bank_and_its_questions_are_asked_in_chat(tmp_path):
    """The whole `hiermem build --docs F --questions Q` on the tiny anchor: a bank, and the user's questions
    among the chat evaluation's trained cases (memory off / auto / retrieval side by side)."""
    from training.pipeline import run_build

    folder = tmp_path / "notes"
    folder.mkdir()
    places = [("Zorblat", "Quxland"), ("Ilvan", "Praxia"), ("Mersk", "Tolland"), ("Vantro", "Oskia")]
    for name, land in places:
        (folder / f"{name.lower()}.md").write_text(f"# {name}\n\n{name} is a town in {land}. {name} has a harbour.\n")
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question": f"Where is {n}?", "answer": land}) + "\n"
                                 for n, land in places))
    out = run_build("tiny", docs=[folder], questions=questions, bank_dir=tmp_path / "bank", work=tmp_path / "work")
    from memory_store.bank import is_version_root

    assert is_version_root(tmp_path / "bank")  # `hiermem bank update` publishes its next versions there
    chat = out["result"]["chat"]
    asked = [c["message"] for c in chat["per_case"] if c["family"] == "trained"]
    assert asked == [f"Where is {n}?" for n, _ in places]
    assert {"off", "auto", "retrieval"} <= set(chat["per_case"][0])


def test_without_questions_the_build_checks_itself_in_chat(tmp_path):
    """No --questions: the documents' subjects are asked in generic requests (and general prompts), memory off /
    auto / retrieval, and the report says how often the memory opened and how the replies read."""
    from training.pipeline import run_build

    folder = tmp_path / "notes"
    folder.mkdir()
    for name, land in [("Zorblat", "Quxland"), ("Ilvan", "Praxia"), ("Mersk", "Tolland")]:
        (folder / f"{name.lower()}.md").write_text(f"{name} is a town in {land}. {name} has a harbour.\n")
    out = run_build("tiny", docs=[folder], bank_dir=tmp_path / "bank", work=tmp_path / "work")
    assert out["result"] is None and "self-check" in out["status"]["stages"]
    report = json.loads((tmp_path / "work" / "eval" / "selfcheck.json").read_text())
    free = [c for c in report["per_case"] if c["family"] == "free"]
    assert sorted(c["subject"] for c in free) == ["Ilvan", "Mersk", "Zorblat"]
    assert report["families"]["general"]["n"] > 0
    assert (tmp_path / "work" / "eval" / "selfcheck.md").read_text().startswith("# Self-check")
    again = run_build("tiny", docs=[folder], bank_dir=tmp_path / "bank", work=tmp_path / "work")  # resumes
    from memory_store.ops import list_versions

    assert len(list_versions(tmp_path / "bank")) == 1 and again["status"]["stages"] == out["status"]["stages"]
