"""deploy/k8s: the kustomize build validated against the Kubernetes OpenAPI schemas (kubernetes-validate
ships them, strict mode rejects unknown fields), then checked for the references between objects."""

from __future__ import annotations

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
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 50051
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_one_deployment_per_bank_shard_with_native_grpc_probes(objects):
    deployments = by_kind(objects, "Deployment")
    shards = {name: d for name, d in deployments.items() if name.startswith("hiermem-shard-")}
    assert sorted(shards) == ["hiermem-shard-0", "hiermem-shard-1"]
    for name, d in shards.items():
        c = d["spec"]["template"]["spec"]["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == 50051, (name, probe)
        env = {e["name"]: e for e in c["env"]}
        assert env["HIERMEM_BANK_SHARD"]["value"] == name.rsplit("-", 1)[1]
        assert env["HIERMEM_BANK_ADVERTISE_ADDRESS"]["value"] == "$(POD_IP):50051"
        # $(POD_IP) only expands when POD_IP is defined earlier in the list
        names = [e["name"] for e in c["env"]]
        assert names.index("POD_IP") < names.index("HIERMEM_BANK_ADVERTISE_ADDRESS")


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
                assert vol["secret"]["secretName"] in secrets
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
    for prefix, cls in (("HIERMEM_BANK_", BankServerSettings), ("HIERMEM_MODEL_", ModelServerSettings),
                        ("HIERMEM_INIT_", EnsureBankSettings)):
        unknown = [k for k in config if k.startswith(prefix) and k.removeprefix(prefix).lower() not in cls.model_fields]
        assert not unknown, f"{cls.__name__} has no fields for {unknown}"
    keys_path = Path(config["HIERMEM_MODEL_API_KEYS_FILE"])
    mounts = {m["mountPath"] for m in model["volumeMounts"]}
    assert str(keys_path.parent) in mounts


def test_all_pods_run_as_non_root(objects):
    for workload in [*by_kind(objects, "Deployment").values(), *by_kind(objects, "Job").values()]:
        pod = workload["spec"]["template"]["spec"]
        if workload["metadata"]["name"] == "redis":
            continue  # the official redis image runs as its own redis user
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001


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
