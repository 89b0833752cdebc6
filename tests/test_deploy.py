"""The Kubernetes manifests render with kustomize and say what the server needs."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed")


def test_base_renders_with_grpc_health_probes_and_the_home_volume():
    import yaml

    rendered = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "deploy" / "k8s" / "base")], capture_output=True, text=True, check=True
    ).stdout
    docs = {d["kind"]: d for d in yaml.safe_load_all(rendered)}
    assert set(docs) == {"Deployment", "Service", "PersistentVolumeClaim"}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["TLSERVE_GRPC_ADDRESS"] == "0.0.0.0:50051"
    assert container["readinessProbe"]["grpc"] == {"port": 50051, "service": "tlserve.v1.TLServe"}
    assert container["livenessProbe"]["grpc"]["port"] == 50051
    # Drain (TLSERVE_GRACE_SECONDS) must end before the kubelet's SIGKILL.
    assert pod["terminationGracePeriodSeconds"] > float(env["TLSERVE_GRACE_SECONDS"])
    assert container["volumeMounts"][0]["mountPath"] == env["TLSERVE_HOME"]
    # Secure by default: it listens on 0.0.0.0, so it must have tokens, from a Secret.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env["TLSERVE_AUTH_TOKENS_FILE"].startswith(mounts["auth"] + "/")
    assert {v["name"]: v for v in pod["volumes"]}["auth"]["secret"]["secretName"] == "tlserve-auth"
    assert "TLSERVE_INSECURE" not in env
    assert docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]


def _rendered(path: pathlib.Path) -> list[dict]:
    import yaml

    out = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("folder", ["k8s/base", "monitoring"])
def test_every_rendered_object_is_valid_against_the_kubernetes_schemas(folder):
    """Strict: an unknown or misplaced field fails, as the API server would refuse it
    (schemas ship inside kubernetes-validate: no network)."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for obj in _rendered(ROOT / "deploy" / folder):
        kubernetes_validate.validate(obj, "1.30.0", strict=True)


def test_the_pod_meets_the_restricted_pod_security_standard():
    [deployment] = [d for d in _rendered(ROOT / "deploy" / "k8s" / "base") if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
        assert context["readOnlyRootFilesystem"] is True
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        env = {e["name"]: e["value"] for e in container["env"]}
        # With a read-only root, everything written needs a volume: the home, /tmp, /dev/shm.
        assert {env["TLSERVE_HOME"], "/tmp", "/dev/shm"} <= mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
