"""training/progress.py: one line for a whole build, the running stage and its ETA on it."""

from __future__ import annotations

from training.progress import Task, build_display, task


def test_inside_a_build_every_stage_draws_on_the_same_line():
    with build_display() as display:
        assert display is not None
        first = task("prefix states", 4, "batch")
        for _ in range(4):
            first.update()
        first.close()
        line = display.bar
        assert line is not None and line.n == 4 and line.desc == "[prefix states]"
        second = task("train", 100, "step", initial=30)
        assert display.bar is line  # reset, not a second bar
        assert line.total == 100 and line.n == 30 and line.desc == "[train]" and line.unit == "step"
        second.set_postfix_str("loss=1.234")
        assert "loss=1.234" in line.postfix and "build 0:0" in line.postfix  # the stage's figures, the build's time
        assert task("eval", 3, "part", enabled=False).bar is None  # another rank: nothing
        assert display.stages == ["prefix states", "train"]
    assert line.disable or line.n == 30  # closed with the build


def test_outside_a_build_a_task_is_its_own_bar_or_nothing():
    quiet = task("train", 10, enabled=False)
    assert isinstance(quiet, Task) and quiet.bar is None
    quiet.update()
    quiet.set_postfix_str("x")
    own = task("train", 10, "step")
    own.update(3)
    assert own.bar.n == 3 and own.bar.desc == "train"
    own.close()


def test_greedy_decode_reports_each_batch():
    from lm import load_anchor
    from lm.generate import default_eos_ids, greedy_decode

    a = load_anchor("tiny")
    seen: list[int] = []
    out = greedy_decode(a.model, [[1, 2, 3]] * 5, 2, default_eos_ids(a.model, a.tokenizer), batch=2,
                        on_batch=seen.append)
    assert len(out) == 5 and seen == [2, 2, 1]
