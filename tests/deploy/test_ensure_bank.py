"""`hiermem ensure-bank`, what the compose bank-init service and the k8s Job run."""

from __future__ import annotations

import json

import pytest

from hiermem.launcher import EnsureBankSettings, ensure_bank


def test_builds_into_an_empty_directory_once_then_leaves_it_alone(tmp_path, monkeypatch):
    bank = tmp_path / "banks" / "current"
    bank.mkdir(parents=True)  # what a fresh volume mount looks like
    monkeypatch.setenv("HIERMEM_INIT_BRANCHING", "2,2")  # settings come from the environment, as in a pod
    monkeypatch.setenv("HIERMEM_INIT_RANKS", "4,2")
    settings = EnsureBankSettings(bank=bank, anchor="tiny", dtype="float32")
    assert settings.branching == [2, 2] and settings.ranks == [4, 2]
    assert ensure_bank(settings) == bank

    from lm import load_anchor
    from memory_store import Bank

    opened = Bank.open(bank)
    assert opened.shard_ids == ["0", "1"]
    assert opened.anchor.model_dump() == load_anchor("tiny").identity  # the model server accepts it
    assert opened.spec.n_layers == len(opened.spec.memory_layers)
    manifest = bank / "manifest.json"
    before = manifest.stat().st_mtime_ns
    ensure_bank(settings)
    assert manifest.stat().st_mtime_ns == before


def test_rejects_an_unknown_source():
    with pytest.raises(ValueError, match="source"):
        EnsureBankSettings(source="download")


def test_demo_source_builds_the_documents_preset_without_evaluation(tmp_path, monkeypatch):
    """The demo bank (what scripts/run.sh serves) is the `demo` preset (a fifth of the documents corpus), built into the bank directory with the
    evaluation and the generic control left out so that the first run fits its time budget; the command must
    parse as `hiermem`'s."""
    import subprocess

    from hiermem.cli import build_parser
    from hiermem.launcher import DEMO_PRESET, demo_bank

    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", lambda argv, check: calls.append(argv))
    bank = tmp_path / "banks" / "demo"
    assert ensure_bank(EnsureBankSettings(bank=bank, source="demo")) == bank
    (argv,) = calls
    assert argv[1:3] == ["-m", "hiermem.cli"]
    args = build_parser().parse_args(argv[3:])
    assert (args.command, args.preset, args.out, args.no_eval, args.no_generic) == ("build", "demo", str(bank),
                                                                                     True, True)
    assert DEMO_PRESET == "demo" and demo_bank().name == "demo"

    from training.pipeline import PRESETS

    assert PRESETS[DEMO_PRESET]["corpus"]["style"] == "documents"  # a user's corpus, not the probe-shaped one
    assert "preserve_ratio" not in PRESETS[DEMO_PRESET]["corpus"]  # and no preserve file


def test_an_old_facts_build_under_the_demo_name_is_set_aside_and_the_demo_built(tmp_path, monkeypatch):
    """Until 2026-12-02 the facts corpus's preset was called `demo`: a home from then holds its build under
    work/demo and banks/demo. ensure-bank renames both (never deletes) and builds the current demo; `hiermem
    build` refuses such a work directory with a message that names it."""
    import subprocess

    from hiermem.launcher import demo_bank
    from training.pipeline import StaleWork, run_build, stale_preset_work

    monkeypatch.setenv("HIERMEM_HOME", str(tmp_path))
    work, bank = tmp_path / "work" / "demo", demo_bank()
    (work / "corpus").mkdir(parents=True)
    for name in ("docs.jsonl", "probes.jsonl", "preserve.jsonl"):  # the facts corpus has a preserve file
        (work / "corpus" / name).write_text("")
    bank.mkdir(parents=True)
    (bank / "manifest.json").write_text("{}")
    assert "preserve file" in stale_preset_work("demo", work)
    assert stale_preset_work("facts", work) is None  # the facts preset has one
    with pytest.raises(StaleWork, match=str(work)):
        run_build("demo")
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", lambda argv, check: calls.append(argv))
    assert ensure_bank(EnsureBankSettings(source="demo")) == bank
    assert len(calls) == 1 and not work.exists() and not bank.exists()  # set aside, then built
    aside = sorted(p.name for p in tmp_path.glob("*/*.stale-*"))
    assert [n.split(".stale-")[0] for n in aside] == ["demo", "demo"]
    # a build that recorded its preset is judged by the record: the current demo's is not stale
    from training.pipeline import PRESETS

    (work / "corpus").mkdir(parents=True)
    (work / "corpus" / "probes.jsonl").write_text("")
    (work / "build.json").write_text(json.dumps({"stages": {}, "preset": {"name": "demo",
                                                                           "corpus": PRESETS["demo"]["corpus"]}}))
    assert stale_preset_work("demo", work) is None
    (work / "build.json").write_text(json.dumps({"stages": {}, "preset": {"name": "demo", "corpus": {}}}))
    assert "another corpus" in stale_preset_work("demo", work)
