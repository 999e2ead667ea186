"""Offline checks of the stack's security settings: the Redis password wiring of docker-compose.yml, the
mutual-TLS override deploy/compose.mtls.yml (normalised by Docker Compose v2 itself) and the certificates
deploy/make-certs.sh makes. The live run of both is tests/deploy/test_compose_live.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from tests.deploy.test_compose import ROOT, compose_config

MAKE_CERTS = ROOT / "deploy" / "make-certs.sh"
ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"


@pytest.fixture
def mtls_config(tmp_path):
    keys = tmp_path / "api-keys.json"
    keys.write_text('{"keys": []}')
    out = compose_config(ROOT / "docker-compose.yml", ROOT / "deploy" / "compose.mtls.yml",
                         env={"HIERMEM_API_KEYS_FILE": str(keys)})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["services"]


def test_redis_has_a_password_that_shards_and_model_read_from_its_volume(mtls_config):
    redis = mtls_config["redis"]
    assert not redis.get("ports")
    script = redis["command"][0]
    assert "requirepass" in script and "redis-server -" in script  # the password on stdin, not argv
    assert "REDISCLI_AUTH" in redis["healthcheck"]["test"][1]
    for name in ("shard-0", "shard-1", "model"):
        svc = mtls_config[name]
        assert svc["environment"]["HIERMEM_REDIS_PASSWORD_FILE"] == "/run/hiermem-redis/password"
        auth = [v for v in svc["volumes"] if v["source"] == "redis-auth"]
        assert auth and auth[0]["read_only"] and auth[0]["target"] == "/run/hiermem-redis", name


def test_mtls_override_sets_real_settings_and_waits_for_the_certificates(mtls_config):
    from services.memory_bank.settings import BankServerSettings
    from services.model_server.settings import ModelServerSettings

    init = mtls_config["certs-init"]
    assert init["command"] == ["hiermem-make-certs", "/certs"] and init["network_mode"] == "none"
    for name, prefix, cls in (("shard-0", "HIERMEM_BANK_", BankServerSettings),
                              ("shard-1", "HIERMEM_BANK_", BankServerSettings),
                              ("model", "HIERMEM_MODEL_", ModelServerSettings)):
        svc = mtls_config[name]
        tls = {k: v for k, v in svc["environment"].items() if k.startswith(prefix) and "_TLS_" in k}
        assert len(tls) >= 3, (name, tls)
        assert all(k.removeprefix(prefix).lower() in cls.model_fields for k in tls), tls
        assert all(v.startswith("/certs/") for k, v in tls.items() if k.endswith("_FILE")), tls
        assert svc["depends_on"]["certs-init"]["condition"] == "service_completed_successfully"
        certs = [v for v in svc["volumes"] if v["source"] == "certs"]
        assert certs and certs[0]["read_only"], name
    assert mtls_config["model"]["environment"]["HIERMEM_MODEL_BANK_TLS_SERVER_NAME"] == "hiermem-shard"
    probe = mtls_config["shard-0"]["healthcheck"]["test"]
    assert probe[1:6] == ["python", "-m", "hiermem.launcher", "probe", "--grpc"]
    assert {"--tls-ca-file", "--tls-cert-file", "--tls-key-file"} <= set(probe)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing")
def test_make_certs_makes_a_ca_a_shared_shard_certificate_and_a_client_one(tmp_path):
    d = tmp_path / "certs"
    out = subprocess.run(["sh", str(MAKE_CERTS), str(d)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert {p.name for p in d.iterdir()} == {"ca.pem", "shard.pem", "shard.key", "model.pem", "model.key"}
    assert all((d / k).stat().st_mode & 0o077 == 0 for k in ("shard.key", "model.key"))
    for cert in ("shard.pem", "model.pem"):
        assert subprocess.run(["openssl", "verify", "-CAfile", str(d / "ca.pem"), str(d / cert)],
                              capture_output=True).returncode == 0
    text = subprocess.run(["openssl", "x509", "-in", str(d / "shard.pem"), "-noout", "-text"],
                          capture_output=True, text=True).stdout
    assert "DNS:hiermem-shard" in text and "IP Address:127.0.0.1" in text
    assert "TLS Web Server Authentication" in text and "TLS Web Client Authentication" in text
    before = (d / "ca.pem").read_bytes()
    again = subprocess.run(["sh", str(MAKE_CERTS), str(d)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "kept" in again.stdout and (d / "ca.pem").read_bytes() == before


def test_entrypoint_puts_the_redis_password_into_the_urls(tmp_path):
    fake = tmp_path / "hiermem"
    fake.write_text('#!/bin/sh\necho "$HIERMEM_BANK_REDIS_URL|$HIERMEM_MODEL_REDIS_URL"\n')
    fake.chmod(0o755)
    pw = tmp_path / "password"
    pw.write_text("0123abcd")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIERMEM_")}
    env.update(PATH=f"{tmp_path}{os.pathsep}{env.get('PATH', '')}", HIERMEM_REDIS_PASSWORD_FILE=str(pw),
               HIERMEM_BANK_REDIS_URL="redis://redis:6379/0", HIERMEM_MODEL_REDIS_URL="redis://:other@r:1/0")
    out = subprocess.run([str(ENTRYPOINT), "serve-bank"], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "redis://:0123abcd@redis:6379/0|redis://:other@r:1/0", out.stderr
    missing = subprocess.run([str(ENTRYPOINT), "serve-bank"], capture_output=True, text=True,
                             env=env | {"HIERMEM_REDIS_PASSWORD_FILE": str(tmp_path / "nope")})
    assert missing.returncode != 0 and "not readable" in missing.stderr
