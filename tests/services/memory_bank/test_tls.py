"""Shards can serve over TLS and mutual TLS; the client dials with a CA and, for mTLS, its certificate."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from memory_store import path_refs
from services.memory_bank.client import BankClient

from .conftest import running_shards

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate (EC P-256)."""
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test-ca",
             cwd=d)
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        ext = ["-extfile", "server.ext"] if name == "server" else []
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", *ext, cwd=d)
    return d


def test_mutual_tls(bank_dir, bank, pki):
    tls = {"tls_cert_file": pki / "server.pem", "tls_key_file": pki / "server.key",
           "tls_client_ca_file": pki / "ca.pem"}
    refs = path_refs((0, 2, 9))
    with running_shards(bank_dir, shards=("0",), **tls) as (addresses, _):
        static = {"0": [addresses["0"]]}
        with BankClient(bank, static_addresses=static, tls_ca_file=pki / "ca.pem",
                        tls_cert_file=pki / "client.pem", tls_key_file=pki / "client.key") as client:
            result = client.fetch(refs)
        assert result.failed == {} and set(result.blocks) == set(refs)
        with BankClient(bank, static_addresses=static, tls_ca_file=pki / "ca.pem", timeout_s=3) as no_cert:
            assert set(no_cert.fetch(refs).failed) == set(refs)  # the server wants a client certificate
        with BankClient(bank, static_addresses=static, timeout_s=3) as plaintext:
            assert set(plaintext.fetch(refs).failed) == set(refs)


def test_server_only_tls(bank_dir, bank, pki):
    tls = {"tls_cert_file": pki / "server.pem", "tls_key_file": pki / "server.key"}
    with running_shards(bank_dir, shards=("1",), **tls) as (addresses, _):
        with BankClient(bank, static_addresses={"1": [addresses["1"]]}, tls_ca_file=pki / "ca.pem") as client:
            assert client.fetch(path_refs((3, 12, 50))).failed == {}


def test_client_certificate_without_ca_is_refused(bank, pki):
    with pytest.raises(ValueError):
        BankClient(bank, static_addresses={"0": ["127.0.0.1:1"]}, tls_cert_file=pki / "client.pem",
                   tls_key_file=pki / "client.key")
