"""The memory's output scale (training/scale.py): what scaling does, how the factor is chosen, and that the
trainer folds it into the saved blocks -- chosen on the corpus's valid probes, or as given."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lm import MemoryBatch
from tests.training.conftest import tiny_config
from training.scale import GRID, choose_scale, scaled
from training.trainer import Trainer


def test_scaling_a_block_scales_its_output_and_leaves_the_block_alone():
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(2, 3, 8, 16, generator=g), torch.randn(2, 3, 4, 16, generator=g)]
    h = torch.randn(3, 5, 16, generator=g)
    rows = [[0, 1], [1], [0]]
    before = [b.clone() for b in blocks]
    base = MemoryBatch.build(blocks, rows, [4, 5]).ffn_delta(5, h)
    half = MemoryBatch.build([scaled(b, 0.5) for b in blocks], rows, [4, 5]).ffn_delta(5, h)
    torch.testing.assert_close(half, 0.5 * base)
    for b, b0 in zip(blocks, before, strict=True):
        assert torch.equal(b, b0)


def test_the_best_validation_accuracy_wins_and_ties_go_to_the_larger_scale():
    assert choose_scale({0.5: 0.8, 0.6: 0.9, 1.0: 0.7}) == 0.6
    assert choose_scale({0.5: 0.9, 0.8: 0.9, 1.0: 0.85}) == 0.8
    assert choose_scale({0.3: 0.0, 1.0: 0.0}) == 1.0
    assert GRID[-1] == 1.0 and list(GRID) == sorted(GRID)


def _saved_and_trained(t: Trainer) -> tuple[dict, dict]:
    saved = load_file(str(t.out / "memory.safetensors"))
    return saved, {k: v.detach() for k, v in t.memory.nodes.items()}


def test_auto_scale_is_chosen_on_the_valid_probes_and_folded_into_the_saved_blocks(docs_corpus, tmp_path):
    t = Trainer(tiny_config(docs_corpus, tmp_path / "job", routing="tree", epochs=1))
    assert any(p.split == "valid" for p in t.probes)
    t.train()
    info = json.loads((t.out / "job.json").read_text())["memory_scale"]
    assert info["source"] == "valid probes" and info["n"] == sum(p.split == "valid" for p in t.probes)
    assert info["scale"] in GRID and info["generic_scale"] in GRID
    acc = {float(k): v for k, v in info["accuracy"].items()}
    assert set(acc) == set(GRID) and info["scale"] == choose_scale(acc)
    saved, nodes = _saved_and_trained(t)
    s = info["scale"]
    for k, v in nodes.items():  # gate and up as trained, M_down times the scale; the trainer's own unchanged
        torch.testing.assert_close(saved[k][:, :2], v[:, :2])
        torch.testing.assert_close(saved[k][:, 2], s * v[:, 2])
    torch.testing.assert_close(saved["generic"][:, 2], info["generic_scale"] * t.memory.generic.detach()[:, 2])


def test_a_given_scale_is_used_and_a_corpus_without_valid_probes_keeps_one(corpus_dir, docs_corpus, tmp_path):
    t = Trainer(tiny_config(docs_corpus, tmp_path / "given", routing="tree", memory_scale="0.5"))
    t.train()
    saved, nodes = _saved_and_trained(t)
    assert json.loads((t.out / "job.json").read_text())["memory_scale"]["scale"] == 0.5
    k = next(iter(nodes))
    torch.testing.assert_close(saved[k][:, 2], 0.5 * nodes[k][:, 2])

    facts = Trainer(tiny_config(corpus_dir, tmp_path / "facts"))  # the facts corpus has no valid split
    facts.train()
    assert json.loads((facts.out / "job.json").read_text())["memory_scale"] == {
        "scale": 1.0, "generic_scale": 1.0, "source": "no valid probes"}
    saved, nodes = _saved_and_trained(facts)
    assert all(torch.equal(saved[k], v) for k, v in nodes.items())

    for bad in ("-1", "loud"):  # refused before any training
        with pytest.raises(ValueError, match="memory-scale"):
            Trainer(tiny_config(docs_corpus, tmp_path / "bad", routing="tree", memory_scale=bad))
