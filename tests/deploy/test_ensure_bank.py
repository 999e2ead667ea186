"""`hiermem ensure-bank`, what the compose bank-init service and the k8s Job run."""

from __future__ import annotations

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
    """The demo bank (what scripts/run.sh serves) is the `docs` preset, built into the bank directory with the
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
