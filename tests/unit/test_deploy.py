"""deploy/: hadolint passes on the Dockerfile; every overlay (and the base with every component)
renders with kustomize and validates against the Kubernetes schemas of the oldest and newest
versions we claim; the manifests wire what the server needs (probes, ports, settings that are
real launcher flags, a grace period that covers the drain). The image itself is built and run
in tests/e2e/test_container.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from textgen_backend.cli.launcher import ServerConfig, build_parser
from textgen_backend.cli.tritonserver import EXIT_GRACE_S

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir())
COMPONENTS = sorted(p.name for p in (K8S / "components").iterdir())
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# Settings that are not launcher flags: huggingface_hub's own.
HUB_ENV = {"HF_HUB_OFFLINE", "HF_TOKEN"}


def _tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def render(directory: Path) -> list[dict]:
    result = subprocess.run([_tool("kubectl"), "kustomize", str(directory),
                             "--load-restrictor", "LoadRestrictionsNone"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def with_every_component(tmp_path: Path) -> list[dict]:
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "base", tmp_path)],   # kustomize wants them relative
        "components": [os.path.relpath(K8S / "components" / c, tmp_path) for c in COMPONENTS]}))
    return render(tmp_path)


def validate_core(doc: dict, version: str) -> None:
    """A built-in kind against its strict schema (unknown fields are errors)."""
    kubernetes_validate.validate(doc, version, strict=True)


def validate_container(container: dict, version: str) -> None:
    """A container inside a custom resource (KServe) against the core Container schema."""
    schemas = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / \
        f"v{version}-local-strict"
    schema = yaml.safe_load((schemas / "container-v1.json").read_text())
    definitions = yaml.safe_load((schemas / "_definitions.json").read_text())
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    jsonschema.Draft202012Validator(schema, registry=registry).validate(container)


def deployment_of(docs: list[dict]) -> dict:
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    return deployment


def config_map_of(docs: list[dict]) -> dict:
    [config] = [d for d in docs if d["kind"] == "ConfigMap"]
    return config["data"]


def test_the_dockerfile_passes_hadolint():
    result = subprocess.run([_tool("hadolint"), str(ROOT / "deploy" / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendered_manifest_validates(version, tmp_path):
    rendered = {name: render(K8S / "overlays" / name) for name in OVERLAYS}
    rendered["base + every component"] = with_every_component(tmp_path)
    for name, docs in rendered.items():
        kinds = sorted(d["kind"] for d in docs)
        assert {"ConfigMap", "Deployment", "PersistentVolumeClaim", "Service"} <= set(kinds), name
        for doc in docs:
            if doc["kind"] == "ServiceMonitor":  # the Prometheus operator's resource
                assert doc["spec"]["endpoints"][0]["port"] == "metrics"
                continue
            validate_core(doc, version)
    kserve = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "deploy/kserve").glob("*"))]
    runtime = next(d for d in kserve if d["kind"] == "ServingRuntime")
    service = next(d for d in kserve if d["kind"] == "InferenceService")
    for container in runtime["spec"]["containers"]:
        validate_container(container, version)
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in
                                            runtime["spec"]["supportedModelFormats"]}


def test_a_broken_manifest_fails_validation():
    """The check above can fail: a misspelt field and a wrong type are both caught."""
    docs = render(K8S / "overlays" / "cpu-demo")
    deployment = deployment_of(docs)
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(deployment, "1.30.0")
    with pytest.raises(jsonschema.ValidationError):
        validate_container({"name": "x", "image": "y", "ports": [{"containerPort": "8080"}]},
                           "1.30.0")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_manifests_wire_what_the_server_needs(overlay, tmp_path):
    docs = render(K8S / "overlays" / overlay)
    deployment = deployment_of(docs)
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    server = ServerConfig()
    assert ports == {"http": server.http_port, "grpc": server.grpc_port,
                     "metrics": server.metrics_port, "api": server.api_port}
    [service] = [d for d in docs if d["kind"] == "Service"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
    assert container["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # model load
    # Every setting is a launcher flag's environment variable (a typo would be ignored).
    flags_env = {name for action in build_parser()._actions
                 for name in getattr(action, "env_names", ())}
    settings = config_map_of(docs)
    assert set(settings) - HUB_ENV <= flags_env, set(settings) - HUB_ENV - flags_env
    assert settings["MODEL_ID"] != "set-by-an-overlay"
    # SIGTERM: preStop, then the launcher's drain, then tritonserver's exit, within the grace.
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    needed = pre_stop + float(settings["DRAIN_TIMEOUT_S"]) + 5 + EXIT_GRACE_S
    assert pod["terminationGracePeriodSeconds"] >= needed
    security = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/data", "/tmp", "/dev/shm"} <= mounts
    assert settings["HUGGINGFACE_HUB_CACHE"] == "/data" and settings["HF_HUB_OFFLINE"] == "1"
    if "gpu" in overlay or "h200" in overlay:  # one GPU per shard
        assert container["resources"]["limits"]["nvidia.com/gpu"] == settings.get("NUM_SHARD",
                                                                                 "1")


def test_the_tls_component_names_real_flags_and_the_secret(tmp_path):
    docs = with_every_component(tmp_path)
    [container] = deployment_of(docs)["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    flags_env = {name for action in build_parser()._actions
                 for name in getattr(action, "env_names", ())}
    assert set(env) <= flags_env
    assert env["TLS_CERT_PATH"] == "/etc/textgen/tls/tls.crt"
    assert env["API_PORT"] == "0"  # the front end calls gRPC in plain text
    volumes = {v["name"]: v for v in deployment_of(docs)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "textgen-tls"
    [init] = deployment_of(docs)["spec"]["template"]["spec"]["initContainers"]
    assert "textgen download-weights" in init["command"][-1]
