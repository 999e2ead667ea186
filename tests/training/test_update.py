"""`hiermem bank update` on the tiny anchor: added documents land in leaves and are trained there, every
other block stays byte for byte, removed documents leave no trace in the new version's files, bad input
changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memory_store import Bank, NodeRef
from memory_store.layout import DOCUMENTS_FILE, TRAINING_FILE
from memory_store.ops import init_version_root, list_versions
from memory_store.router import DocRouter
from training.pipeline import run_build
from training.update import UpdateError, update_bank

NEW_TEXT = {"zorblat.txt": "Zorblat is a city in the country of Quxland. Zorblat lies on the Vemmer river.",
            "notes/ilvan.md": "# Ilvan\n\nIlvan is a town in the country of Praxia. Ilvan has a harbour."}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("update")
    run_build("tiny", bank_dir=tmp / "bank", work=tmp / "work", evaluate=False)
    return tmp / "bank"


def _root(built: Path, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    init_version_root(built, root)
    return root


def _blocks(bank_dir: Path) -> dict[NodeRef, bytes]:
    with Bank.open(bank_dir) as bank:
        spec = bank.spec
        return {NodeRef(lv, i): bytes(bank.read_block_bytes(NodeRef(lv, i)))
                for lv in range(1, spec.depth + 1) for i in range(spec.nodes_at(lv))}


def _docs(bank_dir: Path) -> list[dict]:
    with Bank.open(bank_dir) as bank:
        lines = (bank.dir / DOCUMENTS_FILE).read_text().splitlines()
    return [json.loads(line) for line in lines]


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "new"
    for name, text in NEW_TEXT.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def test_a_built_bank_carries_its_documents_and_settings(built):
    docs = _docs(built)
    assert docs and all({"id", "text", "path"} <= set(d) for d in docs)
    assert json.loads((built / TRAINING_FILE).read_text())["anchor"] == "tiny"


def test_add_then_remove(built, tmp_path):
    root = _root(built, tmp_path)
    before, docs_before = _blocks(root), _docs(root)
    out = update_bank(root, add=[str(_folder(tmp_path))], progress=False)
    assert len(list_versions(root)) == 2
    docs = _docs(root)
    added = [d for d in docs if d["id"] in out["added"]]
    assert {d["source"] for d in added} == {"new/zorblat.txt", "new/notes/ilvan.md"}
    assert len(docs) == len(docs_before) + len(added)
    changed = {tuple(p) for p in out["changed_leaves"]}
    assert changed == {tuple(d["path"]) for d in added}
    after = _blocks(root)
    depth = len(docs[0]["path"])
    for ref, data in before.items():
        if ref.level == depth and any(p[-1] == ref.index for p in changed):
            assert after[ref] != data, f"leaf {ref} got new documents but its block did not change"
        else:
            assert after[ref] == data, f"{ref} changed although none of its leaves' documents did"
    router = DocRouter.load(Bank.open(root).dir)
    assert router is not None and set(out["added"]) <= set(router.doc_ids or [])

    gone = update_bank(root, remove=["new/zorblat.txt"], progress=False)
    assert gone["removed"] and all(i.startswith("new/zorblat.txt#") for i in gone["removed"])
    with Bank.open(root) as bank:
        for f in bank.dir.rglob("*"):
            if f.is_file():
                assert b"Zorblat" not in f.read_bytes() and b"zorblat" not in f.read_bytes(), f
    assert {d["id"] for d in _docs(root)} == {d["id"] for d in docs} - set(gone["removed"])


def test_bad_updates_change_nothing(built, tmp_path):
    root = _root(built, tmp_path)
    with pytest.raises(UpdateError, match="no document of the bank has the id or source 'nope.txt'"):
        update_bank(root, remove=["nope.txt"], progress=False)
    with pytest.raises(UpdateError, match="nothing to update"):
        update_bank(root, progress=False)
    with pytest.raises(UpdateError, match="not a versioned bank root"):
        update_bank(built, remove=["x"], progress=False)
    assert len(list_versions(root)) == 1


def test_the_command_names_the_problem(built, tmp_path):
    from hiermem.cli import main

    root = _root(built, tmp_path)
    with pytest.raises(SystemExit, match="hiermem bank update: --remove: no document of the bank has"):
        main(["bank", "update", "--bank", str(root), "--remove", "missing.md"])
    assert len(list_versions(root)) == 1


def test_only_new_trains_the_new_passages_from_the_leaves_blocks(built, tmp_path):
    root = _root(built, tmp_path)
    out = update_bank(root, add=[str(_folder(tmp_path))], progress=False, only_new=True)
    assert out["trained_documents"] == len(out["added"])  # the leaves' earlier documents are not trained again
    assert out["steps"] > 0


def test_an_edited_file_given_alone_replaces_its_passages(built, tmp_path):
    root = _root(built, tmp_path)
    folder = _folder(tmp_path)
    update_bank(root, add=[str(folder)], progress=False)
    edited = tmp_path / "zorblat.txt"  # the same file, edited, given on its own: source "zorblat.txt"
    edited.write_text("Zorblat is a city in the country of Quxland. Zorblat has a glass market.")
    update_bank(root, add=[str(edited)], progress=False)
    mine = [d for d in _docs(root) if "Zorblat" in d["text"]]
    assert len(mine) == 1 and "glass market" in mine[0]["text"]
    assert mine[0]["source"] == "new/zorblat.txt" and mine[0]["id"].startswith("new/zorblat.txt#")
