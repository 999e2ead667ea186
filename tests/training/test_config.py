"""`hiermem train`'s flags come from TrainConfig's fields (base/settings_cli.py), and `hiermem build`'s presets."""

from __future__ import annotations

import argparse

import pytest

from training.config import TrainConfig


def _train_parser() -> argparse.ArgumentParser:
    from hiermem.cli import build_parser

    root = build_parser()
    sub = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def _config(*argv: str) -> TrainConfig:
    from hiermem.cli import build_parser

    return TrainConfig.from_args(build_parser().parse_args(["train", *argv]))


def test_every_field_has_a_flag_with_its_docstring_as_help():
    actions = {opt: a for a in _train_parser()._actions for opt in a.option_strings}
    for name, field in TrainConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        assert flag in actions, f"TrainConfig.{name} has no flag {flag}"
        if field.annotation is bool and not name.startswith("no_"):
            assert "--no-" + name.replace("_", "-") in actions, name
        assert field.description, f"TrainConfig.{name} has no docstring (its flag's help)"
        help_text = " ".join(actions[flag].help.split())
        assert help_text.startswith(" ".join(field.description.split())), name
        assert "[env:" not in help_text  # TrainConfig reads no environment variable


def test_without_flags_the_defaults_hold_and_flags_parse_as_before():
    assert _config().model_dump() == TrainConfig().model_dump()
    cfg = _config("--corpus", "c", "--out", "o", "--branching", "16x16", "--ranks", "64,32", "--memory-layers",
                  "26,27", "--level-lr", "1,3", "--no-progress", "--pronoun-views", "--no-prefix-cache",
                  "--subtree", "1", "--memory-scale", "0.6", "--threads", "2", "--lr", "2e-2", "--loss",
                  "continuation", "--generic-prob", "0")
    assert (cfg.corpus, cfg.out, cfg.branching, cfg.ranks, cfg.memory_layers) == ("c", "o", [16, 16], [64, 32],
                                                                                  [26, 27])
    assert cfg.level_lr == [1.0, 3.0] and cfg.lr == 0.02 and cfg.generic_prob == 0.0
    assert not cfg.progress and cfg.pronoun_views and cfg.no_prefix_cache
    assert (cfg.subtree, cfg.memory_scale, cfg.threads, cfg.loss) == (1, "0.6", "2", "continuation")
    assert _config("--branching", "8,8").branching == [8, 8]
    assert TrainConfig(branching="4x4").branching == [4, 4]
    with pytest.raises(SystemExit):
        _config("--loss", "everything")


def test_the_environment_is_not_read(monkeypatch):
    monkeypatch.setenv("SEED", "5")
    monkeypatch.setenv("EPOCHS", "3")
    assert TrainConfig().seed == 0 and _config().epochs == 10


def test_memory_layers_are_resolved_without_changing_the_config():
    cfg = TrainConfig(mem_layers=2)
    assert cfg.memory_layers_of(30) == [28, 29] and cfg.memory_layers is None
    assert TrainConfig(memory_layers=[4, 8]).memory_layers_of(30) == [4, 8]
    assert TrainConfig(mem_layers=9).memory_layers_of(4) == [0, 1, 2, 3]


def test_build_defaults_to_the_demo_bank_and_refuses_an_unknown_preset(capsys):
    from hiermem.cli import build_parser
    from training.pipeline import DEFAULT_PRESET, PRESETS, run_build

    assert build_parser().parse_args(["build"]).preset == DEFAULT_PRESET == "demo"
    assert build_parser().parse_args(["build", "--preset", "facts"]).preset == "facts"
    # the demo is the docs corpus, smaller, with the same (default) training settings
    assert PRESETS["demo"]["train"] == PRESETS["docs"]["train"] == {}
    assert PRESETS["demo"]["corpus"]["style"] == PRESETS["docs"]["corpus"]["style"] == "documents"
    assert sum(PRESETS["demo"]["corpus"]["sizes"].values()) < sum(PRESETS["docs"]["corpus"]["sizes"].values())
    with pytest.raises(SystemExit):
        build_parser().parse_args(["build", "--preset", "nope"])
    assert "unknown preset 'nope'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown preset 'nope'.*facts"):
        run_build("nope")


def test_the_build_wall_time_adds_an_evaluation_the_first_run_left_out():
    from training.pipeline import build_wall_seconds

    later = {"first_run_seconds": 500.0, "first_run_evaluated": False, "stages": {"eval": {"seconds": 100.0}}}
    assert build_wall_seconds(later) == 600.0  # scripts/run.sh built it with --no-eval, `hiermem build` evaluated
    assert build_wall_seconds({**later, "first_run_evaluated": True}) == 500.0
    assert build_wall_seconds({"first_run_seconds": 500.0, "stages": {}}) == 500.0  # a build.json from before
