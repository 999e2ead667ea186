"""A throw-away PKI for `hiermem up --tls`: a CA, a server certificate for the shards and a client
certificate for the model server and the launcher's probes, made with the openssl command in a private
directory that the launcher removes at exit."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from pathlib import Path


class TlsFiles:
    """PEM files of a throw-away PKI: CA, server certificate (shards) and client certificate (model server
    and probes)."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        self.ca = d / "ca.pem"
        self.server_cert, self.server_key = d / "server.pem", d / "server.key"
        self.client_cert, self.client_key = d / "client.pem", d / "client.key"

    def shard_args(self) -> list[str]:
        return ["--tls-cert-file", str(self.server_cert), "--tls-key-file", str(self.server_key),
                "--tls-client-ca-file", str(self.ca)]

    def model_args(self) -> list[str]:
        return ["--bank-tls-ca-file", str(self.ca), "--bank-tls-cert-file", str(self.client_cert),
                "--bank-tls-key-file", str(self.client_key)]


def make_pki(d: Path, hosts: list[str]) -> TlsFiles:
    """A CA (1 day), a server certificate for `hosts` (DNS names or IPs) and a client certificate, EC
    P-256, with the openssl CLI; keys are readable by this user only."""
    if shutil.which("openssl") is None:
        raise SystemExit("hiermem up --tls needs the openssl command (apt-get install -y openssl)")
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=hiermem-up-ca")
    names = []
    for h in dict.fromkeys([*hosts, "localhost", "127.0.0.1"]):
        try:
            ipaddress.ip_address(h)
            names.append(f"IP:{h}")
        except ValueError:
            names.append(f"DNS:{h}")
    (d / "server.ext").write_text(f"subjectAltName={','.join(names)}\nextendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=hiermem-{name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext")
    (d / "ca.key").unlink()  # nothing more is ever signed
    for key in d.glob("*.key"):
        os.chmod(key, 0o600)
    return TlsFiles(d)
