"""The three service commands turn their settings into flags the same way (base/settings_cli.py): one flag
per field, flags over environment over defaults, booleans as --x / --no-x, refused values named."""

from __future__ import annotations

import argparse

import pytest

from base.settings_cli import add_settings_flags, settings_from_args
from hiermem.cli import build_parser
from hiermem.launcher import EnsureBankSettings, UpSettings
from services.memory_bank.settings import BankServerSettings
from services.model_server.settings import ModelServerSettings

COMMANDS = {"serve-bank": BankServerSettings, "serve-model": ModelServerSettings, "up": UpSettings,
            "ensure-bank": EnsureBankSettings}


def subparser(command: str) -> argparse.ArgumentParser:
    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return actions[0].choices[command]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_field_is_a_flag_that_names_its_variable(command):
    parser, cls = subparser(command), COMMANDS[command]
    flags = {a.dest: a for a in parser._actions}
    assert set(cls.model_fields) <= set(flags)
    prefix = cls.model_config["env_prefix"]
    for name in cls.model_fields:
        assert f"--{name.replace('_', '-')}" in flags[name].option_strings
        assert f"{prefix}{name.upper()}" in (flags[name].help or ""), name


def test_flags_win_over_the_environment_which_wins_over_defaults(monkeypatch, tmp_path):
    parser = build_parser()
    monkeypatch.setenv("HIERMEM_UP_REPLICAS", "3")
    monkeypatch.setenv("HIERMEM_MODEL_MAX_BATCH", "5")
    up = settings_from_args(UpSettings, parser.parse_args(["up", "--port", "0"]))
    assert (up.replicas, up.port, up.liveness_failures) == (3, 0, 3)  # env, flag, default
    up = settings_from_args(UpSettings, parser.parse_args(["up", "--replicas", "2"]))
    assert up.replicas == 2
    model = settings_from_args(ModelServerSettings, parser.parse_args(
        ["serve-model", "--bank", str(tmp_path), "--static-addresses", "0=a:1,0=b:2,1=c:3"]))
    assert model.max_batch == 5 and model.static_addresses == {"0": ["a:1", "b:2"], "1": ["c:3"]}
    init = settings_from_args(EnsureBankSettings, parser.parse_args(["ensure-bank", "--branching", "4,4"]))
    assert init.branching == [4, 4]


@pytest.mark.parametrize(("command", "field", "variable"), [
    ("up", "tls", "HIERMEM_UP_TLS"),
    ("serve-model", "strict", "HIERMEM_MODEL_STRICT"),
    ("serve-bank", "hot_cache_preload", "HIERMEM_BANK_HOT_CACHE_PRELOAD"),
])
def test_booleans_are_flag_pairs(monkeypatch, tmp_path, command, field, variable):
    parser, cls = build_parser(), COMMANDS[command]
    needed = {"serve-model": ["--bank", str(tmp_path)], "serve-bank": ["--bank", str(tmp_path), "--shard", "0"]}
    base = [command, *needed.get(command, [])]
    flag = "--" + field.replace("_", "-")
    assert getattr(settings_from_args(cls, parser.parse_args([*base, flag])), field) is True
    assert getattr(settings_from_args(cls, parser.parse_args([*base, "--no-" + flag[2:]])), field) is False
    monkeypatch.setenv(variable, "true")
    assert getattr(settings_from_args(cls, parser.parse_args([*base, "--no-" + flag[2:]])), field) is False
    assert getattr(settings_from_args(cls, parser.parse_args(base)), field) is True


def test_refused_values_end_the_command_with_the_field_named():
    parser = argparse.ArgumentParser(prog="hiermem up")
    add_settings_flags(parser, UpSettings)
    with pytest.raises(SystemExit, match=r"hiermem up: invalid settings:\n(.|\n)*replicas"):
        settings_from_args(UpSettings, parser.parse_args(["--replicas", "0"]))
    with pytest.raises(TypeError):
        settings_from_args(EnsureBankSettings, parser.parse_args([]))
