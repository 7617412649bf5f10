"""deploy/kubernetes: rendered by ``kubectl kustomize``, validated by ``kubernetes-validate
--strict``, checked for what an operator relies on, and its probes run against a real
``databroker serve`` started with the sidecar's own arguments.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REDIS_URL
from tests.harness import sidecar_env, wait_for
from tests.instances import databroker, log_of, terminate

ROOT = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
KUBECTL = shutil.which("kubectl")
# 1.29: the first release with native sidecars on by default; the newest the validator knows.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
QUANTITY = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")


def render(directory: str) -> str:
    assert KUBECTL is not None
    done = subprocess.run(
        [KUBECTL, "kustomize", str(ROOT / directory)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def objects(directory: str) -> list[dict[str, Any]]:
    return [o for o in yaml.safe_load_all(render(directory)) if o]


def one(rendered: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in rendered if o["kind"] == kind]
    return found


def pod_specs(rendered: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o["spec"]["template"]["spec"] for o in rendered if o["kind"] in ("Deployment", "Job")]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def sidecar(rendered: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(rendered, "Deployment")["spec"]["template"]["spec"]
    (found,) = [c for c in pod["initContainers"] if c["name"] == "databroker"]
    return found


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def quantity(value: str) -> int:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|)", value)
    assert match, f"unexpected quantity {value}"
    return int(match[1]) * QUANTITY[match[2]]


@pytest.fixture(scope="module", params=["base", "overlays/example"])
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return objects(request.param)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("directory", ["base", "overlays/example"])
def test_every_object_validates(directory: str, version: str, tmp_path: Path) -> None:
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(render(directory))
    validate = Path(sys.executable).with_name("kubernetes-validate")
    done = subprocess.run(
        [str(validate), "--strict", "--kubernetes-version", version, str(manifest)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    passed = re.findall(r"passed for resource (\S+)", done.stdout)
    assert len(passed) == len(objects(directory)), done.stdout


def test_restricted_pod_security(rendered: list[dict[str, Any]]) -> None:
    """The "restricted" Pod Security Standard, and a read-only root, for every container."""
    for pod in pod_specs(rendered):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for container in containers(pod):
            context = container["securityContext"]
            user = context.get("runAsUser", pod["securityContext"].get("runAsUser"))
            assert isinstance(user, int) and user > 0, container["name"]
            assert isinstance(context["runAsGroup"], int), container["name"]
            assert context["allowPrivilegeEscalation"] is False, container["name"]
            assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]
            assert context["readOnlyRootFilesystem"] is True, container["name"]
        for volume in pod.get("volumes", []):
            assert set(volume) == {"name", "emptyDir"}, f"{volume['name']}: only emptyDir here"


def test_databroker_is_a_native_sidecar_on_a_group_socket(rendered: list[dict[str, Any]]) -> None:
    pod = one(rendered, "Deployment")["spec"]["template"]["spec"]
    broker = sidecar(rendered)
    assert broker["restartPolicy"] == "Always"
    args = broker["args"]
    assert args[0] == "serve" and "--host" not in args and "--port" not in args
    socket_path = Path(args[args.index("--uds") + 1])
    assert args[args.index("--uds-mode") + 1] == "0660"
    # The socket's group is the pod's fsGroup, which every container of the pod has.
    assert int(args[args.index("--uds-group") + 1]) == pod["securityContext"]["fsGroup"]
    (worker,) = pod["containers"]
    for container in (broker, worker):
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts.get(str(socket_path.parent)) == "socket", container["name"]
    assert env_of(worker)["DATABROKER_UDS"] == str(socket_path)
    assert broker["securityContext"]["runAsUser"] != worker["securityContext"]["runAsUser"]


def test_probes_run_the_probe_command_over_the_socket(rendered: list[dict[str, Any]]) -> None:
    broker = sidecar(rendered)
    socket_path = broker["args"][broker["args"].index("--uds") + 1]
    paths = {}
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = broker[kind]
        assert set(probe) & {"httpGet", "tcpSocket", "grpc"} == set(), kind  # never host 127.0.0.1
        command = probe["exec"]["command"]
        assert command[0] == "databroker-probe" and command[2:] == ["--uds", socket_path]
        assert probe["timeoutSeconds"] <= 1, kind
        paths[kind] = command[1]
    assert paths == {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    assert "127.0.0.1" not in yaml.safe_dump(rendered)


def test_outbox_volume_holds_what_the_broker_may_write(rendered: list[dict[str, Any]]) -> None:
    pod = one(rendered, "Deployment")["spec"]["template"]["spec"]
    broker = sidecar(rendered)
    env = env_of(broker)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert all("sizeLimit" in v["emptyDir"] for v in volumes.values())
    mounts = {m["name"]: m["mountPath"] for m in broker["volumeMounts"]}
    assert mounts["outbox"] == env["DATABROKER_OUTBOX_DIR"]
    limit = quantity(volumes["outbox"]["emptyDir"]["sizeLimit"])
    bound = int(env["DATABROKER_OUTBOX_MAX_BYTES"])
    # Cache hits are still journaled up to twice the bound (README, Records); past the
    # sizeLimit the kubelet evicts the pod, and the outbox goes with it.
    assert limit >= 2 * bound + 64 * 2**20
    requested = quantity(broker["resources"]["requests"]["ephemeral-storage"])
    assert requested >= limit + quantity(volumes["tmp"]["emptyDir"]["sizeLimit"])
    assert "medium" not in volumes["outbox"]["emptyDir"], "a Memory outbox would count as RAM"


def test_termination_leaves_time_to_drain(rendered: list[dict[str, Any]]) -> None:
    pod = one(rendered, "Deployment")["spec"]["template"]["spec"]
    grace = float(env_of(sidecar(rendered))["DATABROKER_SHUTDOWN_GRACE"])
    # In-flight requests, then the last shipment, each up to SHUTDOWN_GRACE, after the
    # worker's own stop: at least 10 s for the worker here.
    assert pod["terminationGracePeriodSeconds"] >= 2 * grace + 10


def test_secrets_are_referenced_never_defined(rendered: list[dict[str, Any]]) -> None:
    assert not [o for o in rendered if o["kind"] == "Secret"]
    for pod in pod_specs(rendered):
        for container in containers(pod):
            for name, value in env_of(container).items():
                if name in (
                    "DATABROKER_DATABASE_URL",
                    "DATABROKER_REDIS_URL",
                    "DATABROKER_SECRET_KEY",
                ):
                    assert set(value) == {"secretKeyRef"}, name
            assert "envFrom" not in container


def test_migration_job_gets_only_the_database_url(rendered: list[dict[str, Any]]) -> None:
    job = one(rendered, "Job")
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "migration"
    assert job["spec"]["ttlSecondsAfterFinished"] > 0 and job["spec"]["backoffLimit"] > 0
    (migrate,) = job["spec"]["template"]["spec"]["containers"]
    assert migrate["args"] == ["migrate"]
    assert list(env_of(migrate)) == ["DATABROKER_DATABASE_URL"]
    # Its network policy comes with it when only the migration is applied (`-l`).
    policies = [o for o in rendered if o["kind"] == "NetworkPolicy"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    (policy,) = [
        p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    ]
    assert policy["metadata"]["labels"]["app.kubernetes.io/component"] == "migration"


def test_network_policy_and_disruption_budget_select_the_workers(
    rendered: list[dict[str, Any]],
) -> None:
    deployment = one(rendered, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    budget = one(rendered, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] == 1
    (policy,) = [
        p
        for p in rendered
        if p["kind"] == "NetworkPolicy"
        and p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    ]
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["ingress"] == []
    vendors = [
        block["ipBlock"]
        for rule in policy["spec"]["egress"]
        for block in rule.get("to", [])
        if "ipBlock" in block
    ]
    assert vendors and all("169.254.0.0/16" in block["except"] for block in vendors)


def test_example_overlay_is_a_release() -> None:
    rendered = objects("overlays/example")
    namespace = one(rendered, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert all(
        o["metadata"].get("namespace") == namespace["metadata"]["name"]
        for o in rendered
        if o["kind"] != "Namespace"
    )
    images = [c["image"] for pod in pod_specs(rendered) for c in containers(pod)]
    assert all(
        re.fullmatch(r"[\w.-]+(/[\w.-]+)+(:[\w.-]+|@sha256:[0-9a-f]{64})", i) for i in images
    )
    assert not any(i.endswith(":latest") for i in images)
    job = one(rendered, "Job")
    tag = sidecar(rendered)["image"].rsplit(":", 1)[1]
    assert job["metadata"]["name"] == f"databroker-migrate-{tag.replace('.', '-')}"


@pytest.mark.slow
def test_sidecar_arguments_and_probes_work(pg_url: str, redis_prefix: str, tmp_path: Path) -> None:
    """``databroker`` with the sidecar's rendered arguments, and each rendered probe
    command against it: the socket moved under tmp_path, nothing else changed."""
    broker = sidecar(objects("overlays/example"))
    socket_path = broker["args"][broker["args"].index("--uds") + 1]
    here = str(tmp_path / "databroker.sock")
    args = [here if a == socket_path else a for a in broker["args"]]
    if os.geteuid() != 0:  # only root may give the socket a group it is not in
        args[args.index("--uds-group") + 1] = str(os.getgid())
    env = sidecar_env(pg_url, REDIS_URL, tmp_path / "outbox", redis_prefix=redis_prefix)
    env |= {
        k: v
        for k, v in env_of(broker).items()
        if isinstance(v, str) and k != "DATABROKER_OUTBOX_DIR"
    }
    bin_dir = Path(sys.executable).parent

    def probe(kind: str) -> subprocess.CompletedProcess[str]:
        command = [here if a == socket_path else a for a in broker[kind]["exec"]["command"]]
        return subprocess.run(
            [str(bin_dir / command[0]), *command[1:]],
            capture_output=True,
            text=True,
            timeout=broker[kind]["timeoutSeconds"] + 5,
        )

    with databroker(args, env, tmp_path) as process:

        def started() -> bool:
            assert process.poll() is None, f"databroker exited:\n{log_of(tmp_path)}"
            return probe("startupProbe").returncode == 0

        wait_for(started, timeout=60, interval=0.2)
        for kind in ("livenessProbe", "readinessProbe"):
            done = probe(kind)
            assert done.returncode == 0, f"{kind}: {done.stdout}"
        terminate(process)
    done = probe("livenessProbe")
    assert done.returncode == 1 and "no answer" in done.stdout
