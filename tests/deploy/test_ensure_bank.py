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
