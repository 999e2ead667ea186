"""deploy/k8s: the kustomize build validated against the Kubernetes OpenAPI schemas (kubernetes-validate
ships them, strict mode rejects unknown fields), then checked for the references between objects."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.30.0"  # oldest version we promise (native gRPC probes are GA since 1.27)
CLUSTER_SCOPED = {"Namespace"}
# Secrets the operator creates before the first apply (docs/operating.md, "Kubernetes"), with their keys:
# not in the kustomization, so a checkout never carries a private key or a password everybody knows.
OPERATOR_SECRETS = {"hiermem-certs": {"ca.pem", "shard.pem", "shard.key", "model.pem", "model.key"},
                    "hiermem-redis": {"password"}}
SHARD_TLS = {"HIERMEM_BANK_TLS_CERT_FILE": "shard.pem", "HIERMEM_BANK_TLS_KEY_FILE": "shard.key",
             "HIERMEM_BANK_TLS_CLIENT_CA_FILE": "ca.pem"}
MODEL_TLS = {"HIERMEM_MODEL_BANK_TLS_CA_FILE": "ca.pem", "HIERMEM_MODEL_BANK_TLS_CERT_FILE": "model.pem",
             "HIERMEM_MODEL_BANK_TLS_KEY_FILE": "model.key"}


def kustomize_build(directory: Path) -> list[dict]:
    """`kubectl kustomize` when kubectl is installed; otherwise the same build for what the base uses
    (resources + namespace; the test below fails on any other kustomization field)."""
    if shutil.which("kubectl"):
        out = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs = []
    for res in kust["resources"]:
        for doc in yaml.safe_load_all((directory / res).read_text()):
            if doc and kust.get("namespace") and doc["kind"] not in CLUSTER_SCOPED:
                doc.setdefault("metadata", {})["namespace"] = kust["namespace"]
            if doc:
                docs.append(doc)
    return docs


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return kustomize_build(K8S)


def by_kind(objects, kind):
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def secret_files(workload: dict, secret: str, container: int = 0) -> dict[str, str]:
    """Key of `secret` -> the path it has in the workload's container (read-only mounts only)."""
    pod = workload["spec"]["template"]["spec"]
    c = pod["containers"][container]
    files = {}
    for vol in pod.get("volumes", []):
        if vol.get("secret", {}).get("secretName") != secret:
            continue
        items = {i["key"]: i["path"] for i in vol["secret"].get("items", [])} or \
            {k: k for k in OPERATOR_SECRETS.get(secret, ())}
        for m in c.get("volumeMounts", []):
            if m["name"] == vol["name"] and m.get("readOnly") and "subPath" not in m:
                files.update({k: f"{m['mountPath'].rstrip('/')}/{p}" for k, p in items.items()})
    return files


def env_of(workload: dict) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in workload["spec"]["template"]["spec"]["containers"][0].get("env", [])}


def shard_tls_problems(shard: dict) -> list[str]:
    """Why a shard Deployment does not serve mutual TLS with the hiermem-certs files (and probe over it)."""
    files, env = secret_files(shard, "hiermem-certs"), env_of(shard)
    problems = [f"{var} is {env.get(var)!r}, not the mounted {key} ({files.get(key)})"
                for var, key in SHARD_TLS.items() if key not in files or env.get(var) != files[key]]
    if "model.key" in files:
        problems.append("the shard pod mounts the model server's key")
    c = shard["spec"]["template"]["spec"]["containers"][0]
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        cmd = c.get(name, {}).get("exec", {}).get("command", [])
        flags = dict(zip(cmd, cmd[1:], strict=False))
        want = {"--grpc": "127.0.0.1:50051", "--tls-ca-file": files.get("ca.pem"),
                "--tls-cert-file": files.get("shard.pem"), "--tls-key-file": files.get("shard.key")}
        if cmd[:4] != ["python", "-m", "hiermem.launcher", "probe"] or any(flags.get(k) != v for k, v in want.items()):
            problems.append(f"{name} is not the mutual-TLS gRPC probe: {c.get(name)}")
    return problems


def model_tls_problems(model: dict) -> list[str]:
    """Why the model-server Deployment does not dial the shards over mutual TLS with the hiermem-certs files."""
    files, env = secret_files(model, "hiermem-certs"), env_of(model)
    problems = [f"{var} is {env.get(var)!r}, not the mounted {key} ({files.get(key)})"
                for var, key in MODEL_TLS.items() if key not in files or env.get(var) != files[key]]
    # the one name every shard replica's certificate has (deploy/make-certs.sh's default)
    name = re.search(r"HIERMEM_CERTS_SERVER_NAME:-([\w.-]+)", (ROOT / "deploy" / "make-certs.sh").read_text())
    if not name or env.get("HIERMEM_MODEL_BANK_TLS_SERVER_NAME") != name.group(1):
        problems.append(f"HIERMEM_MODEL_BANK_TLS_SERVER_NAME is {env.get('HIERMEM_MODEL_BANK_TLS_SERVER_NAME')!r}")
    if "shard.key" in files:
        problems.append("the model-server pod mounts the shards' key")
    return problems


def redis_problems(objects: list[dict]) -> list[str]:
    """Why Redis does not require a password that every client gets from hiermem-redis, or is reachable
    from outside the namespace's shard and model-server pods."""
    problems = []
    deployments, config = by_kind(objects, "Deployment"), by_kind(objects, "ConfigMap")["hiermem-config"]["data"]
    redis = deployments["redis"]
    c = redis["spec"]["template"]["spec"]["containers"][0]
    pw = secret_files(redis, "hiermem-redis").get("password")
    script = " ".join(c.get("command", []) + c.get("args", []))
    if not pw or f"requirepass $(cat {pw})" not in script or "redis-server -" not in script:
        problems.append(f"redis-server does not read requirepass from the mounted hiermem-redis password: {script!r}")
    if "--requirepass" in script:
        problems.append("the password is on redis-server's command line")
    if "REDISCLI_AUTH" not in " ".join(c.get("readinessProbe", {}).get("exec", {}).get("command", [])):
        problems.append("the readiness probe does not authenticate (it would fail against requirepass)")
    for name, d in deployments.items():
        if name.startswith(("hiermem-shard-", "hiermem-model")):
            want = secret_files(d, "hiermem-redis").get("password")
            if not want or env_of(d).get("HIERMEM_REDIS_PASSWORD_FILE") != want:
                problems.append(f"{name} does not get the Redis password (HIERMEM_REDIS_PASSWORD_FILE)")
    for k in ("HIERMEM_BANK_REDIS_URL", "HIERMEM_MODEL_REDIS_URL"):
        if not config[k].startswith("redis://redis:") or "@" in config[k]:
            problems.append(f"{k} = {config[k]} (the entrypoint adds the password to a URL without one)")
    for name, svc in by_kind(objects, "Service").items():
        if svc["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items():
            if svc["spec"].get("type", "ClusterIP") != "ClusterIP" or svc["spec"].get("externalIPs"):
                problems.append(f"Service {name} exposes Redis outside the cluster")
    policies = [p for p in by_kind(objects, "NetworkPolicy").values()
                if p["spec"]["podSelector"]["matchLabels"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()]
    if not policies or not all("Ingress" in p["spec"]["policyTypes"] for p in policies):
        problems.append("no NetworkPolicy limits who reaches Redis")
    for p in policies:
        for rule in p["spec"].get("ingress", []):
            if not rule.get("from") or any(set(peer) != {"podSelector"} for peer in rule["from"]):
                problems.append(f"NetworkPolicy {p['metadata']['name']} admits peers outside the namespace: {rule}")
    return problems


def test_kustomization_lists_every_manifest_and_nothing_else():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(kust) <= {"apiVersion", "kind", "namespace", "resources"}
    assert sorted(kust["resources"]) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_every_object_validates_against_the_kubernetes_schema(objects):
    assert len(objects) >= 12
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)  # raises ValidationError


def test_the_validator_rejects_a_schema_violation(objects):
    """Guards the guard: a misspelt probe field must not validate."""
    deployment = dict(by_kind(objects, "Deployment")["hiermem-shard-0"])
    bad = yaml.safe_load(yaml.safe_dump(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["commands"] = ["true"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_one_deployment_per_bank_shard_serving_mutual_tls(objects):
    deployments = by_kind(objects, "Deployment")
    shards = {name: d for name, d in deployments.items() if name.startswith("hiermem-shard-")}
    assert sorted(shards) == ["hiermem-shard-0", "hiermem-shard-1"]
    for name, d in shards.items():
        # TLS env + the certificate volume + probes over mutual TLS (native grpc probes cannot show a
        # client certificate, so they would fail against a shard that requires one)
        assert shard_tls_problems(d) == [], name
        c = d["spec"]["template"]["spec"]["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert "grpc" not in c[probe] and c[probe]["timeoutSeconds"] >= 3, (name, probe)
        env = {e["name"]: e for e in c["env"]}
        assert env["HIERMEM_BANK_SHARD"]["value"] == name.rsplit("-", 1)[1]
        assert env["HIERMEM_BANK_ADVERTISE_ADDRESS"]["value"] == "$(POD_IP):50051"
        # $(POD_IP) only expands when POD_IP is defined earlier in the list
        names = [e["name"] for e in c["env"]]
        assert names.index("POD_IP") < names.index("HIERMEM_BANK_ADVERTISE_ADDRESS")


def test_the_model_server_dials_the_shards_over_mutual_tls(objects):
    assert model_tls_problems(by_kind(objects, "Deployment")["hiermem-model"]) == []


def test_redis_requires_a_password_and_only_the_namespace_pods_reach_it(objects):
    assert redis_problems(objects) == []


def _without_env(workload: dict, var: str) -> None:
    c = workload["spec"]["template"]["spec"]["containers"][0]
    c["env"] = [e for e in c["env"] if e["name"] != var]


def _without_volume(workload: dict, secret: str) -> None:
    pod = workload["spec"]["template"]["spec"]
    pod["volumes"] = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") != secret]


def _plain_redis(redis: dict) -> None:
    c = redis["spec"]["template"]["spec"]["containers"][0]
    c.pop("command")
    c["args"] = ["--save", "", "--appendonly", "no"]  # the image's default entrypoint, no password


BREAKAGES = {
    "shard without client CA": ("shard", lambda o: _without_env(by_kind(o, "Deployment")["hiermem-shard-1"],
                                                                 "HIERMEM_BANK_TLS_CLIENT_CA_FILE")),
    "shard without certificates": ("shard", lambda o: _without_volume(by_kind(o, "Deployment")["hiermem-shard-0"],
                                                                      "hiermem-certs")),
    "shard with a native grpc probe": ("shard", lambda o: by_kind(o, "Deployment")["hiermem-shard-0"]["spec"]
                                       ["template"]["spec"]["containers"][0].update(
                                           readinessProbe={"grpc": {"port": 50051}})),
    "shard with the model key": ("shard", lambda o: by_kind(o, "Deployment")["hiermem-shard-0"]["spec"]["template"]
                                 ["spec"]["volumes"][1]["secret"]["items"].append({"key": "model.key",
                                                                                   "path": "model.key"})),
    "model dials plaintext": ("model", lambda o: _without_env(by_kind(o, "Deployment")["hiermem-model"],
                                                              "HIERMEM_MODEL_BANK_TLS_CA_FILE")),
    "model checks another name": ("model", lambda o: [e.update(value="shard-0") for e in by_kind(o, "Deployment")
                                                      ["hiermem-model"]["spec"]["template"]["spec"]["containers"][0]
                                                      ["env"] if e["name"] == "HIERMEM_MODEL_BANK_TLS_SERVER_NAME"]),
    "redis without requirepass": ("redis", lambda o: _plain_redis(by_kind(o, "Deployment")["redis"])),
    "model without the password": ("redis", lambda o: _without_env(by_kind(o, "Deployment")["hiermem-model"],
                                                                   "HIERMEM_REDIS_PASSWORD_FILE")),
    "redis on a NodePort": ("redis", lambda o: by_kind(o, "Service")["redis"]["spec"].update(type="NodePort")),
    "redis open to other namespaces": ("redis", lambda o: by_kind(o, "NetworkPolicy")["hiermem-redis"]["spec"]
                                       ["ingress"][0]["from"].append({"namespaceSelector": {}})),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_the_security_checks_fail_on_a_broken_manifest(objects, breakage):
    """Guards the guards: each way of losing mutual TLS or the Redis password, made on a loaded copy."""
    which, breaks = BREAKAGES[breakage]
    broken = copy.deepcopy(objects)
    breaks(broken)
    check = {"shard": lambda o: shard_tls_problems(by_kind(o, "Deployment")["hiermem-shard-0"]) +
             shard_tls_problems(by_kind(o, "Deployment")["hiermem-shard-1"]),
             "model": lambda o: model_tls_problems(by_kind(o, "Deployment")["hiermem-model"]),
             "redis": redis_problems}[which]
    assert check(objects) == [] and check(broken), breakage


def test_the_operator_secrets_are_documented(objects):
    """Secrets the manifests mount but do not contain: docs/operating.md says how to make each of them."""
    docs = (ROOT / "docs" / "operating.md").read_text()
    mounted = {v["secret"]["secretName"] for w in [*by_kind(objects, "Deployment").values(), *by_kind(objects, "Job").values()]
               for v in w["spec"]["template"]["spec"].get("volumes", []) if "secret" in v}
    assert mounted - set(by_kind(objects, "Secret")) == set(OPERATOR_SECRETS)
    assert "deploy/make-certs.sh" in docs
    for name in OPERATOR_SECRETS:
        assert f"create secret generic {name}" in docs, name


def test_references_between_objects_resolve(objects):
    services, deployments = by_kind(objects, "Service"), by_kind(objects, "Deployment")
    for name, svc in services.items():
        selector = svc["spec"]["selector"].items()
        matches = [d for d in deployments.values() if selector <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert matches, f"Service {name} selects no pods"
    configmaps, secrets, pvcs = by_kind(objects, "ConfigMap"), by_kind(objects, "Secret"), \
        by_kind(objects, "PersistentVolumeClaim")
    for workload in [*deployments.values(), *by_kind(objects, "Job").values()]:
        pod = workload["spec"]["template"]["spec"]
        for c in pod.get("initContainers", []) + pod["containers"]:
            for src in c.get("envFrom", []):
                assert src["configMapRef"]["name"] in configmaps
        for vol in pod.get("volumes", []):
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"]["claimName"] in pvcs
            if "secret" in vol:
                name = vol["secret"]["secretName"]
                assert name in secrets or name in OPERATOR_SECRETS, name
                keys = OPERATOR_SECRETS.get(name) or set(secrets[name].get("stringData", {})) | \
                    set(secrets[name].get("data", {}))
                assert {i["key"] for i in vol["secret"].get("items", [])} <= keys, vol
    hpa = by_kind(objects, "HorizontalPodAutoscaler")["hiermem-model"]
    assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
    target = deployments[hpa["spec"]["scaleTargetRef"]["name"]]
    assert target["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]


def test_model_server_probes_and_settings(objects):
    from hiermem.launcher import EnsureBankSettings
    from services.memory_bank.settings import BankServerSettings
    from services.model_server.settings import ModelServerSettings

    model = by_kind(objects, "Deployment")["hiermem-model"]["spec"]["template"]["spec"]["containers"][0]
    assert model["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert model["livenessProbe"]["httpGet"]["path"] == "/health"
    config = by_kind(objects, "ConfigMap")["hiermem-config"]["data"]
    # the ConfigMap and every container's own env (the TLS settings live next to their mounts)
    names = set(config) | {e["name"] for d in by_kind(objects, "Deployment").values()
                           for c in d["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])}
    for prefix, cls in (("HIERMEM_BANK_", BankServerSettings), ("HIERMEM_MODEL_", ModelServerSettings),
                        ("HIERMEM_INIT_", EnsureBankSettings)):
        unknown = [k for k in names if k.startswith(prefix) and k.removeprefix(prefix).lower() not in cls.model_fields]
        assert not unknown, f"{cls.__name__} has no fields for {unknown}"
    keys_path = Path(config["HIERMEM_MODEL_API_KEYS_FILE"])
    mounts = {m["mountPath"] for m in model["volumeMounts"]}
    assert str(keys_path.parent) in mounts


def test_all_pods_run_as_non_root(objects):
    for workload in [*by_kind(objects, "Deployment").values(), *by_kind(objects, "Job").values()]:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        # the official redis image's own redis user; hiermem's image: 10001
        assert pod["securityContext"]["runAsUser"] == (999 if workload["metadata"]["name"] == "redis" else 10001)


def test_the_bank_is_a_subdirectory_of_the_pvc_mount(objects):
    """A bank is published by renaming a sibling temp directory onto its name: the bank path must lie
    below the PVC's mount point, in every pod (the Job writes, the others only read)."""
    config = by_kind(objects, "ConfigMap")["hiermem-config"]["data"]
    banks = {Path(config[k]) for k in ("HIERMEM_INIT_BANK", "HIERMEM_BANK_BANK", "HIERMEM_MODEL_BANK")}
    assert len(banks) == 1
    bank = banks.pop()
    for workload in [*by_kind(objects, "Deployment").values(), *by_kind(objects, "Job").values()]:
        pod = workload["spec"]["template"]["spec"]
        claims = {v["name"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        for c in pod.get("initContainers", []) + pod["containers"]:
            for m in c.get("volumeMounts", []):
                if m["name"] in claims:
                    assert Path(m["mountPath"]) in bank.parents, (workload["metadata"]["name"], m)
                    assert m.get("readOnly", False) == (workload["kind"] != "Job")


def test_budgets_and_policies_select_real_pods(objects):
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in by_kind(objects, "Deployment").values()]

    def selects(selector: dict) -> bool:
        return any(selector.items() <= labels.items() for labels in pods)

    budgets = by_kind(objects, "PodDisruptionBudget")
    assert {"hiermem-shard-0", "hiermem-shard-1", "hiermem-model"} <= set(budgets)
    for name, pdb in budgets.items():
        assert selects(pdb["spec"]["selector"]["matchLabels"]), name
    for name, policy in by_kind(objects, "NetworkPolicy").items():
        assert selects(policy["spec"]["podSelector"]["matchLabels"]), name
        for rule in policy["spec"]["ingress"]:
            for peer in rule.get("from", []):
                assert selects(peer["podSelector"]["matchLabels"]), (name, peer)
    shard_policy = by_kind(objects, "NetworkPolicy")["hiermem-shards"]["spec"]["ingress"][0]
    assert shard_policy["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "hiermem-model"}
