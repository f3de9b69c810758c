"""The torchpool image, built once per test session with podman, and containers run from it.

``built_image()`` runs deploy/build-image.sh (a local Debian base, a folder of
wheels, an offline ``podman build``) the first time any test asks, and hands
every later caller the same result. Where podman cannot run at all the tests
are skipped with the reason, unless ``TORCHPOOL_CONTAINER_REQUIRED=1`` (set by
scripts/test on machines that can install podman, i.e. CI): there a missing
engine is a failure, never a silent skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, free_port, wait_for

BUILD_SCRIPT = ROOT / "deploy" / "build-image.sh"
IMAGE = os.environ.get("TORCHPOOL_IMAGE", "localhost/torchpool:0.1.0")
# Debootstrap, wheels and the build together, on a slow machine with nothing cached.
BUILD_TIMEOUT_S = 1500
# What one test using the image may take, its share of the build included.
TEST_TIMEOUT_S = BUILD_TIMEOUT_S + 300
MAX_NPROC = 32768


def run_flags() -> list[str]:
    """Flags every ``podman run`` needs on CI's machines.

    crun, podman's default runtime, fails on hosts with hybrid cgroups; runc
    works. podman's default ulimits may exceed what the host lets a container
    set, so it gets this process's open-files limit and at most 32768
    processes (as deploy/build-image.sh does; more is refused on CI's machines).
    """
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    nproc = tuple(
        MAX_NPROC if v == resource.RLIM_INFINITY else min(v, MAX_NPROC)
        for v in resource.getrlimit(resource.RLIMIT_NPROC)
    )

    def limit(pair: tuple[int, ...]) -> str:
        return ":".join("-1" if v == resource.RLIM_INFINITY else str(v) for v in pair)

    return [
        "--runtime=runc",
        "--ulimit",
        f"nofile={limit(nofile)}",
        "--ulimit",
        f"nproc={limit(nproc)}",
    ]


def podman(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout_s, check=False
    )


def unavailable() -> str | None:
    """Why podman cannot run containers here, or None when it can."""
    for tool in ("podman", "runc"):
        if shutil.which(tool) is None:
            return (
                f"{tool} is not installed (Debian: apt-get install podman runc debootstrap; "
                "scripts/test does this when run as root)"
            )
    info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}")
    if info.returncode != 0:
        return f"podman cannot run here: {info.stderr.strip().splitlines()[-1:]}"
    return None


@dataclass(frozen=True)
class Image:
    """A built image and what ``podman image inspect`` says about it."""

    name: str
    inspect: dict[str, Any]
    build_log: str

    @property
    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = self.inspect["Config"]
        return config

    @property
    def size_bytes(self) -> int:
        size: int = self.inspect["Size"]
        return size

    @property
    def env(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.config.get("Env", []))


_built: Image | str | None = None


def built_image() -> Image:
    """The image, built on first use; skips (or fails, where required) without podman."""
    global _built
    reason = unavailable()
    if reason is not None:
        if os.environ.get("TORCHPOOL_CONTAINER_REQUIRED") == "1":
            pytest.fail(f"container tests are required here, but {reason}")
        pytest.skip(reason)
    if _built is None:
        # The wheels are for the image's Python: this interpreter's pip builds them.
        env = {**os.environ, "PYTHON": sys.executable, "TORCHPOOL_IMAGE": IMAGE}
        started = time.monotonic()
        result = subprocess.run(
            [str(BUILD_SCRIPT)],
            capture_output=True,
            text=True,
            env=env,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            _built = f"deploy/build-image.sh failed ({result.returncode}):\n{result.stderr[-4000:]}"
        else:
            (inspect,) = json.loads(podman("image", "inspect", IMAGE).stdout)
            steps = [line for line in result.stderr.splitlines() if "build-image:" in line]
            took = time.monotonic() - started
            _built = Image(IMAGE, inspect, "\n".join([*steps, f"total {took:.0f}s"]))
    if isinstance(_built, str):
        pytest.fail(_built)
    return _built


class Container:
    """One detached ``podman run`` of the image, serving on a free loopback port."""

    def __init__(
        self,
        image: Image,
        env: dict[str, str] | None = None,
        volumes: list[str] | None = None,
        args: list[str] | None = None,
    ) -> None:
        self.name = f"torchpool-test-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        container_port = (env or {}).get("TORCHPOOL_PORT", image.env["TORCHPOOL_PORT"])
        command = ["run", "--detach", "--name", self.name, *run_flags()]
        # As Kubernetes runs it (deploy/k8s): read-only root, /tmp a tmpfs, no capabilities.
        command += ["--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL"]
        command += ["--security-opt", "no-new-privileges"]
        command += ["--publish", f"127.0.0.1:{self.port}:{container_port}"]
        for key, value in (env or {}).items():
            command += ["--env", f"{key}={value}"]
        for volume in volumes or []:
            command += ["--volume", volume]
        started = podman(*command, image.name, *(args or []))
        if started.returncode != 0:
            podman("rm", "--force", "--time", "0", self.name)
            raise AssertionError(f"podman run failed: {started.stderr}")
        self.client = httpx.Client(base_url=self.url, timeout=30.0)

    def state(self) -> dict[str, Any]:
        result = podman("inspect", "--format", "{{json .State}}", self.name)
        assert result.returncode == 0, result.stderr
        state: dict[str, Any] = json.loads(result.stdout)
        return state

    def logs(self) -> str:
        result = podman("logs", self.name)
        return result.stdout + result.stderr

    def wait_ready(self, workers: int, timeout_s: float = 180.0) -> None:
        """Until /health/ready answers 200 and all ``workers`` are ready.

        /health/ready needs only --min-ready workers (1 by default); the
        checks that follow look at every worker, so wait for all of them.
        """

        def ready() -> bool:
            state = self.state()
            assert state["Running"], f"the container exited ({state['ExitCode']}):\n{self.logs()}"
            with contextlib.suppress(httpx.HTTPError):
                if self.client.get("/health/ready").status_code != 200:
                    return False
                return bool(self.client.get("/health").json()["ready_workers"] == workers)
            return False

        wait_for(ready, timeout_s, "/health/ready in the container", interval_s=0.25)

    def healthcheck(self) -> subprocess.CompletedProcess[str]:
        """Run the image's HEALTHCHECK command inside the container once."""
        return podman("healthcheck", "run", self.name)

    def stop(self, timeout_s: float) -> tuple[int, float]:
        """``podman stop``: the image's STOPSIGNAL, then SIGKILL after ``timeout_s``.

        Returns the exit code and the seconds the stop took.
        """
        started = time.monotonic()
        result = podman("stop", "--time", str(int(timeout_s)), self.name, timeout_s=timeout_s + 60)
        took = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        exit_code: int = self.state()["ExitCode"]
        return exit_code, took

    def remove(self) -> None:
        self.client.close()
        podman("rm", "--force", "--time", "0", self.name)
