"""A user's own files as a training corpus (`hiermem build --docs PATH...`).

Memories are trained on short documents (training/data.py caps each at MAX_DOC_TOKENS), and the tree routes
each document as a whole, so a long file is cut into passages of about one topic each rather than truncated.
The cutting is semantic-text-splitter's (`TextSplitter`, `MarkdownSplitter` for markdown): it splits at the
highest semantic boundary (section, paragraph, sentence, word) that keeps a passage within its capacity,
counted in the anchor's tokens when a tokenizer is given.

Every passage's id is derived from where it comes from and what it says, so reading unchanged files again
gives the same ids (a build resumes) and a changed passage gets a new id (a build sees its corpus is stale).
Errors are `IngestError`s that name the file (and the line of a JSONL file), since the user has to fix them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from training.corpus import USER_RELATION, Corpus, Probe

log = logging.getLogger(__name__)

KINDS = {".txt": "text", ".md": "markdown", ".markdown": "markdown", ".jsonl": "jsonl"}
"""The file types read, by suffix (any case)."""


class IngestError(ValueError):
    """A file that cannot be read as passages or questions; the message names the file (and line)."""


def read_passages(paths: Sequence[str | Path], tokenizer: Any = None, max_tokens: int = 160) -> list[dict]:
    """The passages of the files and folders in `paths`: ``{"id", "text", "source"}`` each (and ``"meta"``: a
    JSONL line's other keys, when it has some).

    Folders are read recursively in sorted order, hidden files and folders aside; files of other types found
    there are skipped with a warning, while a named file of another type is an error. A passage holds
    max_tokens // 2 .. max_tokens tokens of `tokenizer` (a transformers fast tokenizer), or four times as
    many characters without one; its whitespace is collapsed to single spaces.
    """
    fits, split = _splitters(tokenizer, max_tokens)
    out: list[dict] = []
    where: dict[str, str] = {}  # id -> source
    for arg in paths:
        for path, source in _files(Path(arg)):
            for passage in _file_passages(path, source, split, fits):
                if passage["id"] in where:
                    raise IngestError(f"passage id {passage['id']!r} is given twice: by {where[passage['id']]} "
                                      f"and by {source}")
                where[passage["id"]] = source
                out.append(passage)
    if not out:
        raise IngestError(f"no passages in {', '.join(str(p) for p in paths) or 'no paths'}: give .txt, .md, "
                          f".markdown or .jsonl files with some text")
    return out


def read_questions(path: str | Path) -> list[dict]:
    """``{"question", "answer"}`` per line of a JSONL file: the questions a build evaluates the bank on."""
    path = Path(path)
    out = []
    for n, line in _lines(path):
        row = _json_line(path, n, line)
        for key in ("question", "answer"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise IngestError(f"{path}:{n}: needs a non-empty {key!r} string")
        out.append({"question": row["question"].strip(), "answer": row["answer"].strip()})
    if not out:
        raise IngestError(f"{path}: no questions")
    return out


def write_docs_corpus(passages: Sequence[dict], out_dir: str | Path,
                      questions: Sequence[dict] | None = None) -> Corpus:
    """Save the passages (and questions, as ``train`` probes of one bucket) in the corpus format of
    training/corpus.py; the questions state no document of their own, so they carry no ``doc_id``."""
    docs = [{k: p[k] for k in ("id", "text", "source", "meta") if k in p} for p in passages]
    probes = [Probe(prompt=q["question"], answer=" " + q["answer"].strip(), bucket=1, relation=USER_RELATION,
                    split="train", template="user") for q in questions or []]
    corpus = Corpus(docs=docs, probes=probes)
    corpus.save(Path(out_dir))
    return corpus


# ---------------------------------------------------------------------------------------------------------


def _files(arg: Path) -> list[tuple[Path, str]]:
    """(file, source) of each readable file `arg` names: itself, or what its folder holds."""
    if not arg.exists():
        raise IngestError(f"{arg}: no such file or folder")
    if not arg.is_dir():
        if arg.suffix.lower() not in KINDS:
            raise IngestError(f"{arg}: unsupported file type {arg.suffix or '(none)'!r}; "
                              f"supported: {', '.join(KINDS)}")
        return [(arg, arg.name)]
    root = arg.resolve().name
    found: list[str] = []
    skipped: list[str] = []
    for folder, dirs, names in os.walk(arg):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            rel = (Path(folder) / name).relative_to(arg).as_posix()
            if name.startswith("."):
                continue
            (found if Path(name).suffix.lower() in KINDS else skipped).append(rel)
    if skipped:
        log.warning("%s: skipped %d file(s) of unsupported type: %s", arg, len(skipped), ", ".join(sorted(skipped)))
    return [(arg / rel, f"{root}/{rel}") for rel in sorted(found)]


def _splitters(tokenizer: Any, max_tokens: int) -> tuple[Callable[[str], bool], dict[str, Any]]:
    """(whether a text fits a passage, splitter per file kind)."""
    from semantic_text_splitter import MarkdownSplitter, TextSplitter

    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, not {max_tokens}")
    if tokenizer is None:
        capacity = (4 * (max_tokens // 2), 4 * max_tokens)
        text, markdown = TextSplitter(capacity), MarkdownSplitter(capacity)

        def size(s: str) -> int:
            return len(s)
    else:
        backend = _untruncated(tokenizer.backend_tokenizer)
        capacity = (max_tokens // 2, max_tokens)
        text = TextSplitter.from_huggingface_tokenizer(backend, capacity)
        markdown = MarkdownSplitter.from_huggingface_tokenizer(backend, capacity)

        def size(s: str) -> int:
            return len(backend.encode(s, add_special_tokens=False).ids)

    return (lambda s: size(s) <= capacity[1]), {"text": text, "markdown": markdown, "jsonl": text}


def _untruncated(backend: Any) -> Any:
    """The tokenizer itself, or a copy without truncation and padding (which would cap or pad the counts);
    the anchor's own tokenizer is left as it is."""
    if backend.truncation is None and backend.padding is None:
        return backend
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def _read(path: Path) -> str:
    """The file's text; undecodable bytes name their line."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise IngestError(f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _lines(path: Path) -> list[tuple[int, str]]:
    """(number, line) of each non-blank line."""
    return [(n, line) for n, line in enumerate(_read(path).splitlines(), 1) if line.strip()]


def _json_line(path: Path, n: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise IngestError(f"{path}:{n}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    if not isinstance(row, dict):
        raise IngestError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
    return row


def _chunks(text: str, splitter: Any, fits: Callable[[str], bool]) -> list[str]:
    """The splitter's chunks, whitespace collapsed, empty ones dropped. A chunk of markdown headings only (a
    section too long for one passage leaves its heading alone) opens the next chunk when both fit together."""
    out: list[str] = []
    heading = ""
    for chunk in splitter.chunks(text):
        if heading and fits(heading + "\n\n" + chunk):
            chunk = heading + "\n\n" + chunk
        elif heading:
            out.append(heading)
        heading = ""
        if all(line.lstrip().startswith("#") for line in chunk.splitlines() if line.strip()):
            heading = chunk
        else:
            out.append(chunk)
    out.append(heading)
    return [t for t in (" ".join(c.split()) for c in out) if t]


def _file_passages(path: Path, source: str, split: dict[str, Any], fits: Callable[[str], bool]) -> list[dict]:
    """One file's passages, numbered k = 0, 1, ... in the file; a JSONL line's "id" names its passage (with
    "#j" appended when its text makes several)."""
    kind = KINDS[path.suffix.lower()]
    records: list[tuple[int, str, str | None, dict]] = []  # (line, text, given id, meta)
    if kind != "jsonl":
        records.append((0, _read(path), None, {}))
    else:
        for n, line in _lines(path):
            row = _json_line(path, n, line)
            if not isinstance(row.get("text"), str):
                raise IngestError(f"{path}:{n}: each line needs a \"text\" string")
            rid = row.get("id")
            if rid is not None and not isinstance(rid, str | int):
                raise IngestError(f"{path}:{n}: \"id\" must be a string or a number")
            records.append((n, row["text"], None if rid is None else str(rid),
                            {k: v for k, v in row.items() if k not in ("id", "text")}))
    out: list[dict] = []
    given: dict[str, int] = {}  # a JSONL id -> its line
    for n, text, rid, meta in records:
        if rid is not None:
            if rid in given:
                raise IngestError(f"{path}:{n}: id {rid!r} is already used on line {given[rid]}")
            given[rid] = n
        chunks = _chunks(text, split[kind], fits)
        for j, chunk in enumerate(chunks):
            if rid is None:
                pid = f"{source}#{len(out)}-{hashlib.sha256(chunk.encode()).hexdigest()[:8]}"
            else:
                pid = rid if len(chunks) == 1 else f"{rid}#{j}"
            out.append({"id": pid, "text": chunk, "source": source, **({"meta": meta} if meta else {})})
    return out
