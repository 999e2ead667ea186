"""Settings come from HIERMEM_BANK_* and from flags that mirror them; flags win; bad values are refused."""

from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError

from services.memory_bank.cli import add_serve_bank_arguments, settings_from_args
from services.memory_bank.settings import BankServerSettings


def parse(argv):
    parser = argparse.ArgumentParser()
    add_serve_bank_arguments(parser)
    return settings_from_args(BankServerSettings, parser.parse_args(argv))


def test_environment_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("HIERMEM_BANK_BANK", str(tmp_path))
    monkeypatch.setenv("HIERMEM_BANK_SHARD", "1")
    monkeypatch.setenv("HIERMEM_BANK_MAX_NODES_PER_CALL", "7")
    from_env = parse([])
    assert (from_env.bank, from_env.shard, from_env.max_nodes_per_call) == (tmp_path, "1", 7)
    flags = parse(["--max-nodes-per-call", "9", "--redis-url", "redis://r:6379/0", "--metrics-port", "0"])
    assert (flags.max_nodes_per_call, flags.redis_url, flags.metrics_port) == (9, "redis://r:6379/0", 0)


def test_every_field_has_a_flag():
    parser = argparse.ArgumentParser()
    add_serve_bank_arguments(parser)
    flags = {a.dest for a in parser._actions}
    assert set(BankServerSettings.model_fields) <= flags


@pytest.mark.parametrize("bad", [
    {"heartbeat_s": 5, "registry_ttl_s": 5},     # would expire between heartbeats
    {"chunk_bytes": 8 * 2**20},                   # above the message limit
    {"port": 70000},
    {"advertise_address": "no-port"},
    {"max_nodes_per_call": 0},
    {"tls_cert_file": "server.pem"},              # without its key
    {"tls_client_ca_file": "ca.pem"},             # mutual TLS without a server certificate
])
def test_invalid_settings_are_refused(tmp_path, bad):
    with pytest.raises(ValidationError):
        BankServerSettings(bank=tmp_path, shard="0", **bad)


def test_advertise_address_defaults(tmp_path):
    s = BankServerSettings(bank=tmp_path, shard="0", host="127.0.0.1")
    assert s.resolved_advertise_address(5000) == "127.0.0.1:5000"
    wildcard = BankServerSettings(bank=tmp_path, shard="0", host="0.0.0.0")
    assert not wildcard.resolved_advertise_address(5000).startswith("0.0.0.0")
    explicit = BankServerSettings(bank=tmp_path, shard="0", advertise_address="bank-0:7000")
    assert explicit.resolved_advertise_address(5000) == "bank-0:7000"


def test_serve_bank_refuses_a_missing_bank_or_shard_with_a_clear_message(tmp_path, bank_dir):
    import subprocess
    import sys

    for args, expect in ((["--bank", str(tmp_path), "--shard", "0"], "not a bank"),
                         (["--bank", str(bank_dir), "--shard", "7"], "no shard '7'")):
        out = subprocess.run([sys.executable, "-m", "services.memory_bank", *args], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 1 and expect in out.stderr and "Traceback" not in out.stderr
