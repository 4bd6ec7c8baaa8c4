"""Checks of the Kubernetes manifests and the Helm chart in deploy/."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_asyncio.client as k8s
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANIFESTS = DEPLOY / "manifests"
CHART = DEPLOY / "helm" / "klio"

# The services and their default health/metrics ports (the user contract in architecture.md).
SERVICES = {"wal-receiver": 9471, "basebackup": 9472, "relay": 9473, "retention": 9474}
# After SIGTERM the runtime gives a service 20 s to stop and exits hard 10 s later
# (klio_common.runtime.lifecycle); Kubernetes must wait longer than that.
RUNTIME_HARD_EXIT_GRACE = 30

Doc = dict[str, Any]

MODELS: dict[str, type] = {
    "Deployment": k8s.V1Deployment,
    "StatefulSet": k8s.V1StatefulSet,
    "Service": k8s.V1Service,
    "ConfigMap": k8s.V1ConfigMap,
    "Secret": k8s.V1Secret,
    "PersistentVolumeClaim": k8s.V1PersistentVolumeClaim,
    "ServiceAccount": k8s.V1ServiceAccount,
}
SCALARS: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "bool": (bool,),
    "float": (int, float),
    "object": (str, int, dict, list),
}


def load_manifests() -> list[Doc]:
    docs: list[Doc] = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        with path.open() as f:
            docs.extend(d for d in yaml.safe_load_all(f) if d is not None)
    return docs


def find(kind: str, name: str) -> Doc:
    matches = [d for d in load_manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name!r} in {MANIFESTS}, found {len(matches)}"
    return matches[0]


def klio_config() -> Doc:
    config = yaml.safe_load(find("ConfigMap", "klio-config")["data"]["klio.yaml"])
    assert isinstance(config, dict)
    return config


def check_schema(value: Any, type_name: str, where: str) -> list[str]:
    """Returns every key unknown to the Kubernetes API model and every scalar of the wrong type."""
    if type_name.startswith("list["):
        if not isinstance(value, list):
            return [f"{where}: expected a list"]
        return [
            p
            for i, v in enumerate(value)
            for p in check_schema(v, type_name[5:-1], f"{where}[{i}]")
        ]
    if type_name.startswith("dict("):
        inner = type_name[5:-1].split(", ", 1)[1]
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping"]
        return [p for k, v in value.items() for p in check_schema(v, inner, f"{where}.{k}")]
    if type_name in SCALARS:
        ok = isinstance(value, SCALARS[type_name])
        if type_name == "int" and isinstance(value, bool):
            ok = False
        return [] if ok else [f"{where}: expected {type_name}, got {value!r}"]
    model = getattr(k8s, type_name)
    if not isinstance(value, dict):
        return [f"{where}: expected a {type_name} mapping"]
    fields = {json: attr for attr, json in model.attribute_map.items()}
    problems = []
    for key, sub in value.items():
        if key not in fields:
            problems.append(f"{where}: unknown field {key!r} in {type_name}")
        else:
            problems.extend(check_schema(sub, model.openapi_types[fields[key]], f"{where}.{key}"))
    return problems


def pod_spec(service: str) -> Doc:
    spec: Doc = find("Deployment", f"klio-{service}")["spec"]["template"]["spec"]
    return spec


def container(service: str) -> Doc:
    containers = pod_spec(service)["containers"]
    assert len(containers) == 1
    c: Doc = containers[0]
    return c


def mount_of(service: str, *, volume: str) -> Doc:
    mounts = [m for m in container(service)["volumeMounts"] if m["name"] == volume]
    assert len(mounts) == 1, f"klio-{service} mounts volume {volume!r} {len(mounts)} times"
    m: Doc = mounts[0]
    return m


def volume(service: str, name: str) -> Doc:
    vols = [v for v in pod_spec(service)["volumes"] if v["name"] == name]
    assert len(vols) == 1, f"klio-{service} has {len(vols)} volumes named {name!r}"
    v: Doc = vols[0]
    return v


def named_port(service: str, port: int | str) -> int:
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in container(service)["ports"] if p["name"] == port]
    assert len(numbers) == 1, f"klio-{service}: no container port named {port!r}"
    n: int = numbers[0]
    return n


def test_every_manifest_is_valid_kubernetes() -> None:
    problems: list[str] = []
    for doc in load_manifests():
        kind = doc.get("kind")
        if kind == "Kustomization":
            continue
        assert kind in MODELS, f"unexpected kind {kind!r} in {MANIFESTS}"
        assert doc.get("metadata", {}).get("name"), f"a {kind} without a name"
        problems += check_schema(doc, MODELS[kind].__name__, f"{kind}/{doc['metadata']['name']}")
    assert problems == []


def test_kustomization_lists_every_manifest_but_the_secret_examples() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    expected = sorted(
        p.name
        for p in MANIFESTS.glob("*.yaml")
        if p.name not in {"kustomization.yaml", "secrets.example.yaml"}
    )
    assert sorted(kustomization["resources"]) == expected


@pytest.mark.parametrize("service", SERVICES)
def test_deployment_runs_the_service_with_the_config(service: str) -> None:
    deployment = find("Deployment", f"klio-{service}")
    spec = deployment["spec"]
    # One writer per Tier-1 path, also during a rollout.
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    c = container(service)
    assert c["command"] == [f"klio-{service}"]
    config_path = c["args"][c["args"].index("--config") + 1]
    config_mount = mount_of(service, volume="config")
    assert config_mount["mountPath"] == config_path
    assert volume(service, "config")["configMap"]["name"] == "klio-config"


@pytest.mark.parametrize(("service", "port"), SERVICES.items())
def test_probes_and_metrics_on_the_service_port(service: str, port: int) -> None:
    c = container(service)
    live = c["livenessProbe"]["httpGet"]
    ready = c["readinessProbe"]["httpGet"]
    assert live["path"] == "/livez"
    assert ready["path"] == "/readyz"
    assert named_port(service, live["port"]) == port
    assert named_port(service, ready["port"]) == port
    assert klio_config()["services"][service]["http_port"] == port
    svc = find("Service", f"klio-{service}")
    assert svc["spec"]["selector"].items() <= pod_spec_labels(service).items()
    assert [p["port"] for p in svc["spec"]["ports"]] == [port]
    assert named_port(service, svc["spec"]["ports"][0]["targetPort"]) == port


def pod_spec_labels(service: str) -> Doc:
    labels: Doc = find("Deployment", f"klio-{service}")["spec"]["template"]["metadata"]["labels"]
    return labels


@pytest.mark.parametrize("service", SERVICES)
def test_tier1_volume_is_mounted_at_the_configured_path(service: str) -> None:
    pvc = find("PersistentVolumeClaim", "klio-tier1")
    assert volume(service, "tier1")["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    mount = mount_of(service, volume="tier1")
    assert mount["mountPath"] == klio_config()["tier1"]["path"]
    assert not mount.get("readOnly", False)


@pytest.mark.parametrize("service", SERVICES)
def test_keys_come_from_a_secret_mounted_as_files(service: str) -> None:
    encryption = klio_config()["encryption"]
    assert encryption["active"] in encryption["keys"]
    secret = volume(service, "keys")["secret"]
    assert secret["defaultMode"] & 0o007 == 0, "key files must not be world-readable"
    mount = mount_of(service, volume="keys")
    assert mount["readOnly"] is True
    assert "subPath" not in mount, "a subPath mount would not see rotated keys"
    for key_id, key_file in encryption["keys"].items():
        assert Path(key_file) == Path(mount["mountPath"]) / key_id
    env_names = {e["name"] for e in container(service).get("env", [])}
    assert not any("KEY" in n for n in env_names), "keys are files, never environment variables"


@pytest.mark.parametrize("service", ["wal-receiver", "basebackup"])
def test_postgres_password_is_a_mounted_file(service: str) -> None:
    mounts = {m["mountPath"] for m in container(service)["volumeMounts"]}
    for cluster in klio_config()["clusters"]:
        assert Path(cluster["password_file"]).parent.as_posix() in mounts
        assert "password=" not in cluster["conninfo"]


@pytest.mark.parametrize("service", SERVICES)
def test_pod_security_and_grace_period(service: str) -> None:
    spec = pod_spec(service)
    assert spec["terminationGracePeriodSeconds"] > RUNTIME_HARD_EXIT_GRACE
    pod_ctx = spec.get("securityContext", {})
    ctx = {**pod_ctx, **container(service).get("securityContext", {})}
    assert ctx.get("runAsNonRoot") is True
    assert ctx.get("runAsUser", 0) != 0
    assert ctx.get("allowPrivilegeEscalation") is False
    assert spec.get("automountServiceAccountToken") is False
    assert spec.get("enableServiceLinks") is False


def test_configmap_is_a_valid_klio_configuration(tmp_path: Path) -> None:
    from klio_common.runtime.settings import Settings

    path = tmp_path / "klio.yaml"
    path.write_text(find("ConfigMap", "klio-config")["data"]["klio.yaml"])
    settings = Settings.load(path, {})
    assert {name: s.http_port for name, s in settings.services.items()} == SERVICES
    assert settings.warnings == []  # encryption is on in the shipped configuration


def test_helm_values_name_the_four_services() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert {name: s["port"] for name, s in values["services"].items()} == SERVICES
    assert values["terminationGracePeriodSeconds"] > RUNTIME_HARD_EXIT_GRACE
    assert values["podSecurityContext"]["runAsNonRoot"] is True
    assert values["tier1"]["mountPath"] == klio_config()["tier1"]["path"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "klio"


def test_helm_templates_are_balanced_and_probe_the_health_paths() -> None:
    opening = re.compile(r"\{\{-?\s*(?:if|range|with|define)\b")
    closing = re.compile(r"\{\{-?\s*end\s*-?\}\}")
    templates = sorted((CHART / "templates").iterdir())
    assert templates
    for path in templates:
        text = path.read_text()
        assert text.count("{{") == text.count("}}"), path.name
        assert len(opening.findall(text)) == len(closing.findall(text)), path.name
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    for needle in ("path: /livez", "path: /readyz", "range $name, $svc := .Values.services"):
        assert needle in deployment


def test_helm_values_only_pass_known_configuration_keys() -> None:
    import msgspec

    from klio_common.runtime.settings import ClusterSettings, Settings

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart_only = {"passwordSecret", "caSecret"}
    cluster_keys = {f.name for f in msgspec.structs.fields(ClusterSettings)}
    for cluster in values["clusters"]:
        assert set(cluster) - chart_only <= cluster_keys
    assert set(values["config"]) <= set(Settings.__struct_fields__)
