"""The same trainer under torchrun (2 processes, gloo) and as per-level-1-subtree jobs merged into one bank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.training.conftest import tiny_config
from training.export import merge_subtree_jobs
from training.trainer import train

ROOT = Path(__file__).resolve().parents[2]
TRAIN_ARGS = ["--anchor", "tiny", "--embedder", "hash-trigram", "--branching", "2,2", "--ranks", "8,4",
              "--mem-layers", "2", "--epochs", "1", "--batch-size", "4", "--no-progress"]


def test_torchrun_two_processes_write_a_loadable_bank(corpus_dir, tmp_path):
    from memory_store import Bank, NodeRef

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "hiermem.cli", "train", "--corpus", str(corpus_dir), "--out", str(out), *TRAIN_ARGS]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bank = Bank.open(out / "bank")
    import json

    job = json.loads((out / "job.json").read_text())
    assert job["world_size"] == 2 and job["steps"] >= 1
    tp = job["throughput"]  # both processes' counts and yardsticks, summed (a collective every process joins)
    assert tp["train_flops"] > 0 and tp["matmul_flops_per_s"] > 0 and tp["flops_ratio"] > 0
    # both processes' batches reached the shared memories: some trained block moved off its zero init
    moved = [float(bank.read_block(NodeRef(2, i))[:, 2].abs().sum()) for i in range(4)]
    assert sum(m > 0 for m in moved) >= 2, moved
    assert float(bank.generic_block()[:, 2].abs().sum()) > 0


def test_subtree_jobs_merge_into_one_bank(corpus_dir, tmp_path):
    from safetensors.torch import load_file

    from memory_store import Bank, NodeRef

    first = train(tiny_config(corpus_dir, tmp_path / "s0", subtree=0))
    assert "bank" not in first
    train(tiny_config(corpus_dir, tmp_path / "s1", subtree=1, tree=str(tmp_path / "s0" / "tree.safetensors")))
    bank_id = merge_subtree_jobs([tmp_path / "s0", tmp_path / "s1"], tmp_path / "bank", n_shards=2)
    bank = Bank.open(tmp_path / "bank")
    assert bank.bank_id == bank_id
    for job in ("s0", "s1"):
        trained = load_file(str(tmp_path / job / "memory.safetensors"))
        sub = int(job[1])
        assert f"1_{sub}" in trained and f"1_{1 - sub}" not in trained
        for key, block in trained.items():
            if key == "generic":
                continue
            level, index = map(int, key.split("_"))
            torch.testing.assert_close(bank.read_block(NodeRef(level, index)), block)
    assert bank.shard_of(NodeRef(1, 0)) != bank.shard_of(NodeRef(1, 1))
    with pytest.raises(ValueError, match="trained twice"):
        merge_subtree_jobs([tmp_path / "s0", tmp_path / "s0"], tmp_path / "bad")
