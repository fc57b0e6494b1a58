"""deploy/k8s: every manifest is valid Kubernetes (checked against the JSON schemas that the
kubernetes-validate package bundles, in strict mode: an unknown or misspelt field fails), and
says what mlpe actually does: real `mlpe` subcommands and flags, MLPE_* variables mlpe reads,
gRPC probes on the ports the Services expose, the agent's node id from the node name, and
no secret in the ConfigMap. No cluster and no network needed."""

from __future__ import annotations

import ast
import contextlib
import io
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from packaging.version import Version

from mlpe.agent.main import parse_sources
from mlpe.cli import build_parser
from mlpe.common import settings as settings_module
from mlpe.common.settings import SettingsError
from mlpe.common.topics import GPU_METRICS
from tests.helpers import REPO_ROOT

K8S_DIR = REPO_ROOT / "deploy" / "k8s"
KUSTOMIZATION = "kustomization.yaml"
NAMESPACE = "mlpe"
# The newest Kubernetes version whose schemas the locked kubernetes-validate bundles.
SCHEMA_VERSION = kubernetes_validate.latest_version()
ENV_NAME = re.compile(r"MLPE_[A-Z0-9_]*[A-Z0-9]")
EXPANSION = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")  # $(VAR) in command/args
SECRET_LOOKING = re.compile(r"TOKEN|PASSWORD|SECRET|WEBHOOK")


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S_DIR.glob("*.y*ml") if p.name != KUSTOMIZATION)


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in _manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


DOCS = _documents()


def _objects(kind: str) -> list[dict]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


def _one(kind: str, name: str) -> dict:
    found = [doc for doc in _objects(kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _workloads() -> list[dict]:
    return [doc for _, doc in DOCS if doc["kind"] in ("Deployment", "DaemonSet")]


def _containers(workload: dict) -> list[dict]:
    spec = workload["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def _configmap() -> dict[str, str]:
    return _one("ConfigMap", "mlpe-config")["data"]


def _secret() -> dict[str, str]:
    return _one("Secret", "mlpe-secrets")["stringData"]


def _container_env(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def _parse(container: dict):
    """The container's command line through mlpe's own argument parser ($(VAR) expanded the
    way the kubelet does, from the container's variables)."""
    command = container.get("command", [])
    assert command == ["mlpe"], f"{container['name']}: command {command}, expected [mlpe]"
    defined = set(_container_env(container)) | set(_configmap())
    argv = []
    for arg in container.get("args", []):
        for var in EXPANSION.findall(arg):
            assert var in defined, f"{container['name']}: $({var}) is not defined in the pod"
        argv.append(EXPANSION.sub(lambda m: f"expanded-{m.group(1).lower()}", arg))
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{container['name']}: `mlpe {' '.join(argv)}` is refused by mlpe's "
                    f"parser: {stderr.getvalue().strip()}")


def _env_names_mlpe_reads() -> set[str]:
    """MLPE_* names read in services/ and agents/: settings.load's `_helper(env, "MLPE_…")`
    calls, `os.environ.get("MLPE_…")`, `os.getenv(…)`, `os.environ["MLPE_…"]`."""
    names: set[str] = set()
    for root in ("services", "agents"):
        for path in (REPO_ROOT / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                candidate = None
                if isinstance(node, ast.Call) and node.args:
                    func, args = node.func, node.args
                    if isinstance(func, ast.Attribute) and func.attr in ("get", "getenv"):
                        candidate = args[0]
                    elif (path.name == "settings.py" and len(args) >= 2
                          and isinstance(args[0], ast.Name) and args[0].id == "env"):
                        candidate = args[1]
                elif (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute)
                      and node.value.attr == "environ"):
                    candidate = node.slice
                if (isinstance(candidate, ast.Constant) and isinstance(candidate.value, str)
                        and ENV_NAME.fullmatch(candidate.value)):
                    names.add(candidate.value)
    return names


# -- schema -----------------------------------------------------------------------------


def test_schema_version_is_recent():
    # gRPC probes are GA since 1.27; anything this old would not be "recent" anyway.
    assert Version(SCHEMA_VERSION) >= Version("1.30"), SCHEMA_VERSION


@pytest.mark.parametrize(
    "filename,doc", DOCS, ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in DOCS]
)
def test_manifest_is_valid_kubernetes(filename, doc):
    try:
        kubernetes_validate.validate(doc, SCHEMA_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        where = ".".join(str(p) for p in err.path) or "(top level)"
        pytest.fail(f"{filename}: {doc['kind']}/{doc['metadata']['name']} is not valid "
                    f"Kubernetes {err.version}: {where}: {err.message}")


def test_strict_validation_catches_a_misspelt_field():
    doc = yaml.safe_load(yaml.safe_dump(_one("Deployment", "mlpe-notify")))
    doc["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "IfNotPresent"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolcy"):
        kubernetes_validate.validate(doc, SCHEMA_VERSION, strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S_DIR / KUSTOMIZATION).read_text())
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["namespace"] == NAMESPACE
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    assert set(listed) == {p.name for p in _manifest_files()}


def test_everything_is_in_the_mlpe_namespace():
    assert _one("Namespace", NAMESPACE)
    for filename, doc in DOCS:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, filename


# -- what the manifests run -------------------------------------------------------------


def test_every_container_runs_a_real_mlpe_subcommand():
    expected = {"mlpe-agent": "agent", "mlpe-stream": "stream", "mlpe-notify": "notify",
                "mlpe-optimizer": "optimizer", "mlpe-control": "control"}
    seen = {}
    for workload in _workloads():
        for container in _containers(workload):
            seen[workload["metadata"]["name"]] = _parse(container).command
    assert seen == expected


def test_images_pull_policy_resources_and_non_root():
    for workload in _workloads():
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for container in _containers(workload):
            assert container["image"] == "mlpe:latest", name
            assert container["imagePullPolicy"] == "IfNotPresent", name
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), (name, bound)
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name


def test_mounts_refer_to_volumes_and_claims_exist():
    claims = {doc["metadata"]["name"] for doc in _objects("PersistentVolumeClaim")}
    for workload in _workloads():
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
        for container in _containers(workload):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, (workload["metadata"]["name"], mount["name"])
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims


# -- settings ---------------------------------------------------------------------------


def test_env_name_scan_finds_known_reads():
    # Guards the scanner below: settings.load's names and the ones read elsewhere.
    assert {"MLPE_KAFKA_BOOTSTRAP", "MLPE_RULES", "MLPE_OPTIMIZER_PORT", "MLPE_CONTROL_TOKEN",
            "MLPE_SLACK_WEBHOOK_URL", "MLPE_CONTROL_NAMESPACE"} <= _env_names_mlpe_reads()


def test_every_mlpe_variable_is_one_mlpe_reads():
    read = _env_names_mlpe_reads()
    for key in [*_configmap(), *_secret()]:
        assert key in read, f"{key} (ConfigMap/Secret) is read by no mlpe code"
    for workload in _workloads():
        for container in _containers(workload):
            expanded = set()
            for arg in container.get("command", []) + container.get("args", []):
                expanded |= set(EXPANSION.findall(arg))
            for name in _container_env(container):
                if not name.startswith("MLPE_") or name in read:
                    continue
                # Allowed only as a $(VAR) in the command line, e.g. MLPE_NODE_ID.
                assert name in expanded, (
                    f"{workload['metadata']['name']}: {name} is read by no mlpe code "
                    "and used in no $(...) of its command line")
            for item in _container_env(container).values():
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in read, ref["key"]


def test_configmap_and_secret_are_valid_settings():
    config = {**_configmap(), **_secret()}
    settings = settings_module.load(config)
    assert settings.kafka_bootstrap == "kafka:9092"
    assert settings.influx_url == "http://influxdb:8086"
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.log_format == "json"
    assert settings.control_port == 50052
    assert int(config["MLPE_OPTIMIZER_PORT"]) == 50051


def test_references_to_configmap_and_secret_resolve():
    secret_keys = set(_secret())
    for workload in _workloads():
        for container in _containers(workload):
            for source in container.get("envFrom", []):
                assert source.get("configMapRef", {}).get("name") == "mlpe-config"
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "mlpe-secrets"
                    assert ref["key"] in secret_keys
                    assert item["name"] == ref["key"]


def test_no_secret_in_the_configmap_or_in_plain_env():
    config, secret = _configmap(), _secret()
    assert not set(config) & set(secret)
    for key, value in config.items():
        assert not SECRET_LOOKING.search(key), f"{key} looks like a secret: put it in the Secret"
        for secret_value in secret.values():
            assert secret_value not in value, f"a Secret value appears in ConfigMap {key}"
    for workload in _workloads():
        for container in _containers(workload):
            for item in container.get("env", []):
                if item["name"] in secret or SECRET_LOOKING.search(item["name"]):
                    assert "value" not in item, f"{item['name']} set in plain text"


def test_secret_holds_only_placeholders():
    secret = _one("Secret", "mlpe-secrets")
    assert "data" not in secret  # base64 would hide a real value from review
    assert set(secret["stringData"]) == {
        "MLPE_INFLUX_TOKEN", "MLPE_CONTROL_TOKEN", "MLPE_SLACK_WEBHOOK_URL"}
    assert {v.rpartition("/")[2] for v in secret["stringData"].values()} == {"change-me"}
    assert secret["stringData"]["MLPE_SLACK_WEBHOOK_URL"].startswith("https://example.invalid/")


def test_service_links_are_off():
    # With service links on, Service mlpe-control would put MLPE_CONTROL_PORT=tcp://IP:50052
    # into every pod of the namespace: not a port, so mlpe refuses to start.
    with pytest.raises(SettingsError, match="MLPE_CONTROL_PORT"):
        settings_module.load({"MLPE_CONTROL_PORT": "tcp://10.96.0.10:50052"})
    link_prefixes = {s["metadata"]["name"].upper().replace("-", "_") for s in _objects("Service")}
    assert any(p.startswith("MLPE_") for p in link_prefixes)
    for workload in _workloads():
        pod = workload["spec"]["template"]["spec"]
        assert pod.get("enableServiceLinks") is False, workload["metadata"]["name"]


# -- gRPC services and probes -----------------------------------------------------------


@pytest.mark.parametrize("name,setting", [("mlpe-control", "MLPE_CONTROL_PORT"),
                                          ("mlpe-optimizer", "MLPE_OPTIMIZER_PORT")])
def test_grpc_probes_on_the_service_port(name, setting):
    deployment = _one("Deployment", name)
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    service = _one("Service", name)
    assert service["spec"]["selector"].items() <= labels.items()
    (service_port,) = service["spec"]["ports"]
    target = service_port.get("targetPort", service_port["port"])
    ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    container_port = ports[target] if isinstance(target, str) else target
    assert container_port in ports.values()
    # The server listens on 0.0.0.0:$PORT from the ConfigMap: the same port everywhere.
    assert container_port == int(_configmap()[setting]) == service_port["port"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        grpc = container[probe]["grpc"]
        assert grpc["port"] == container_port, probe
        # "" is the whole server, which both servers set to SERVING once listening.
        assert grpc.get("service", "") == "", probe


def test_every_service_selects_a_workload():
    for service in _objects("Service"):
        selector = service["spec"]["selector"].items()
        matches = [w for w in _workloads()
                   if selector <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matches) == 1, service["metadata"]["name"]


def test_control_is_a_single_supervisor_with_its_job_volume():
    deployment = _one("Deployment", "mlpe-control")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = _parse(container)
    assert args.slots >= 1  # explicit: os.cpu_count() in a pod is the node's
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[str(args.jobs_dir)] == "jobs"


# -- the agent and the stream -----------------------------------------------------------


def test_agent_node_id_comes_from_the_node_name():
    daemonset = _one("DaemonSet", "mlpe-agent")
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    env = _container_env(container)
    assert env["MLPE_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    args = container["args"]
    assert args[args.index("--node-id") + 1] == "$(MLPE_NODE_ID)"
    assert _parse(container).node_id == "expanded-mlpe_node_id"


def test_agent_watches_gpus_with_nvml_and_spools_to_a_volume():
    daemonset = _one("DaemonSet", "mlpe-agent")
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = _parse(container)
    assert parse_sources(args.source, gpu_present=True) == ["nvml", "host"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert any(k.startswith("nvidia.com/gpu") for k in pod["nodeSelector"])
    env = _container_env(container)
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    assert "utility" in env["NVIDIA_DRIVER_CAPABILITIES"]["value"].split(",")
    # The agent must not take a GPU from training pods.
    assert not any("nvidia.com/gpu" in container["resources"][b] for b in ("requests", "limits"))
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert args.spool_dir in mounts


def test_stream_scales_within_the_gpu_partitions():
    deployment = _one("Deployment", "mlpe-stream")
    assert 1 < deployment["spec"]["replicas"] <= GPU_METRICS.partitions
    for hpa in _objects("HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", "mlpe-stream")
        assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"]
        assert hpa["spec"]["maxReplicas"] == GPU_METRICS.partitions
