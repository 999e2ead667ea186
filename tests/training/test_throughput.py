"""Training throughput (training/throughput.py): exact FLOPs on the counted steps, scaled by padded tokens."""

from __future__ import annotations

import pytest
import torch

from training.throughput import Throughput


def test_counted_steps_give_exact_flops_and_the_rest_are_scaled_by_their_tokens():
    tp = Throughput(torch.float32, every=2)
    assert tp.matmul_flops_per_s > 0
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    for index, tokens in enumerate((10, 30, 10)):  # steps 0 and 2 are counted, step 1 only adds its tokens
        with tp.step(index):
            tp.add_tokens(tokens)
            torch.matmul(a, b)
    assert (tp.counted_flops, tp.counted_tokens, tp.tokens) == (2 * 2 * 8 * 16 * 4, 20, 50)
    assert tp.flops() == pytest.approx(2 * 8 * 16 * 4 * 50 / 10)
    s = tp.summary(train_seconds=2.0)
    assert s["train_flops"] == pytest.approx(tp.flops()) and s["compute_dtype"] == "float32"
    assert s["flops_ratio"] == pytest.approx(s["achieved_flops_per_s"] / s["matmul_flops_per_s"])
    again = Throughput(torch.float32)
    again.load_state_dict(tp.state_dict())  # a resumed job goes on counting where the checkpoint left off
    assert again.flops() == tp.flops()


def test_backward_is_counted_too():
    tp = Throughput(torch.float32, every=1)
    w = torch.randn(16, 4, requires_grad=True)
    with tp.step(0):
        tp.add_tokens(8)
        (torch.randn(8, 16) @ w).sum().backward()
    assert tp.counted_flops == 2 * (2 * 8 * 16 * 4)  # forward + the weight's gradient


def test_a_build_reports_its_training_throughput(tmp_path, capsys):
    import json
    from argparse import Namespace

    from training.pipeline import run_build_command

    args = Namespace(preset="tiny", out=str(tmp_path / "bank"), work=str(tmp_path / "work"), epochs=1,
                     no_eval=True, no_generic=False, docs=None, questions=None)
    assert run_build_command(args) == 0
    out = capsys.readouterr().out
    status = json.loads((tmp_path / "work" / "build.json").read_text())
    assert status["first_run_evaluated"] is False  # --no-eval: a later evaluation adds to the build's wall time
    tp = status["stages"]["train+export"]["throughput"]
    # the compute dtype is measured: float32 here, bfloat16 where its matmuls are clearly faster
    assert tp["train_flops"] > 0 and tp["compute_dtype"] in ("float32", "bfloat16")
    assert f"of this machine's {tp['compute_dtype']} matmul" in out


def test_the_matmul_yardstick_shrinks_its_matmul_to_fit_its_time_budget(monkeypatch):
    from lm import dtype as dt

    sizes = []
    real = dt._best_time
    monkeypatch.setattr(dt, "_best_time", lambda a, b, repeats: sizes.append(a.shape[0]) or real(a, b, repeats))
    assert dt.matmul_flops(torch.float32, budget_s=1e-9) > 0 and sizes == [256]  # the probe only
    sizes.clear()
    assert dt.matmul_flops(torch.float32, n=512, budget_s=1e9) > 0 and sizes == [256, 512]
