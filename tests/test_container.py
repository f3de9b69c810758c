"""The CPU image, built offline and run with podman the way users run it.

deploy/build-image.sh builds it once per session (tests/podman.py). Each test
runs it as Kubernetes does (read-only root, /tmp a tmpfs, no capabilities) and
checks it from outside: readiness, answers against the same model run here,
the user the processes run as, the workers' cores, and a stop under load.
Deselect with ``-m "not container"``; CI runs them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import torch
from torch import nn

from shared.config import ServeSettings
from shared.flags import parse_settings
from tests.conftest import wait_for
from tests.podman import TEST_TIMEOUT_S, Container, Image, built_image
from tests.test_deploy import worst_stop_s
from worker.model.demo import build_demo_model

pytestmark = [pytest.mark.container, pytest.mark.timeout(TEST_TIMEOUT_S)]

ROWS = [[(i * 16 + j) / 100.0 - 1.0 for j in range(16)] for i in range(3)]


class Busy(nn.Module):
    """16 -> 3 through ``depth`` 512-wide layers: enough work that a big batch takes seconds."""

    def __init__(self, depth: int = 40) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            self.inp = nn.Linear(16, 512)
            self.hidden = nn.ModuleList(nn.Linear(512, 512) for _ in range(depth))
            self.out = nn.Linear(512, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.inp(x))
        for layer in self.hidden:
            y = torch.tanh(layer(y))
        out: torch.Tensor = self.out(y)
        return out


def assert_close(got: Any, want: torch.Tensor) -> None:
    torch.testing.assert_close(torch.tensor(got), want, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def image() -> Image:
    image = built_image()
    print(f"\ntorchpool image {image.name}: {image.size_bytes / 1e6:.0f} MB")
    print(image.build_log)
    return image


@pytest.fixture
def run(image: Image) -> Iterator[Any]:
    started: list[Container] = []

    def start(**kwargs: Any) -> Container:
        container = Container(image, **kwargs)
        started.append(container)
        return container

    yield start
    for container in started:
        container.remove()


def declared_uid(image: Image) -> tuple[int, int]:
    user, _, group = image.config["User"].partition(":")
    return int(user), int(group or user)


def processes(container: Container) -> list[psutil.Process]:
    """The container's processes as the host sees them: its PID 1 and every descendant."""
    init = psutil.Process(container.state()["Pid"])
    return [init, *init.children(recursive=True)]


def check_processes(container: Container, image: Image, workers: int) -> None:
    """Everything runs as the image's user; each worker on its own cores, as /health says."""
    uid, gid = declared_uid(image)
    assert uid != 0
    procs = processes(container)
    for proc in procs:
        assert set(proc.uids()) == {uid}, f"{proc.cmdline()} runs as {proc.uids()}"
        assert set(proc.gids()) == {gid}, f"{proc.cmdline()} runs as group {proc.gids()}"
    health = container.client.get("/health").json()
    # The gateway is PID 1 inside the container, so the stop signal reaches it.
    assert health["gateway"]["pid"] == 1
    assert health["total_workers"] == health["ready_workers"] == workers
    # The host sees each worker by its host pid; match them by their cores.
    host_workers = [p for p in procs if "worker" in " ".join(p.cmdline()[1:3])]
    assert len(host_workers) == workers, [p.cmdline() for p in procs]
    pinned = sorted(sorted(p.cpu_affinity() or []) for p in host_workers)
    assert pinned == sorted(sorted(w["cores"]) for w in health["workers"])
    every_core = [core for cores in pinned for core in cores]
    assert len(every_core) == len(set(every_core)), f"workers share cores: {pinned}"


def test_image_serves_the_demo_model_as_its_declared_user(run: Any, image: Image) -> None:
    workers = parse_settings(ServeSettings, [], {}).workers
    container = run()
    container.wait_ready(workers)
    response = container.client.post("/predict", json={"input_tensor": ROWS})
    assert response.status_code == 200, response.text
    with torch.inference_mode():
        want = build_demo_model()(torch.tensor(ROWS))
    assert_close(response.json()["prediction"], want)
    check_processes(container, image, workers)
    # The image's own HEALTHCHECK, run inside it, agrees that it is ready.
    health = container.healthcheck()
    assert health.returncode == 0, health.stdout + health.stderr


def test_mounted_model_with_settings_drains_on_stop(run: Any, image: Image, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    model = Busy().eval()
    torch.jit.save(torch.jit.script(model), models / "busy.pt")
    # Bind mounts keep the host's modes: the image's user must be able to read it.
    models.chmod(0o755)
    (models / "busy.pt").chmod(0o644)
    workers = min(2, len(psutil.Process().cpu_affinity() or [0]))
    settings = {
        "TORCHPOOL_MODEL": "/models/busy.pt",
        "TORCHPOOL_WORKERS": str(workers),
        "TORCHPOOL_INPUT_SHAPE": "16",
        "TORCHPOOL_PORT": "8080",
        # Long, so that a stop well under it is a wide margin on any machine: the
        # stop takes as long as the batch in flight (seconds), not the drain.
        "TORCHPOOL_DRAIN_TIMEOUT_S": "120",
    }
    # The model's path is the container's, not this host's: parse the rest.
    drain_s = parse_settings(
        ServeSettings, [], {k: v for k, v in settings.items() if k != "TORCHPOOL_MODEL"}
    ).drain_timeout_s
    container = run(env=settings, volumes=[f"{models}:/models:ro"])
    container.wait_ready(workers)

    response = container.client.post("/predict", json={"input_tensor": ROWS})
    assert response.status_code == 200, response.text
    with torch.inference_mode():
        assert_close(response.json()["prediction"], model(torch.tensor(ROWS)))
    check_processes(container, image, workers)

    # Light load: clients posting one row at a time, and one big batch that is
    # still being computed when the stop signal arrives.
    answers: list[int] = []
    failures: list[str] = []
    big_answer: list[int] = []
    stopping = threading.Event()

    def post(rows: list[list[float]], into: list[int]) -> None:
        try:
            with httpx.Client(base_url=container.url, timeout=120) as client:
                into.append(client.post("/predict", json={"input_tensor": rows}).status_code)
        except httpx.HTTPError as exc:
            failures.append(repr(exc))

    def client_loop() -> None:
        while not stopping.is_set():
            post(ROWS[:1], answers)

    def inflight() -> int:
        return sum(w["inflight"] for w in container.client.get("/health").json()["workers"])

    big = threading.Thread(target=post, args=([ROWS[0]] * 1500, big_answer))
    big.start()
    wait_for(inflight, 60, "the big batch to be in flight")
    clients = [threading.Thread(target=client_loop) for _ in range(3)]
    for thread in clients:
        thread.start()
    wait_for(lambda: len(answers) >= 3, 60, "the clients' first answers")
    # The load balancer's view: no new requests once the stop begins.
    stopping.set()
    exit_code, took = container.stop(timeout_s=worst_stop_s(drain_s) + 10)
    for thread in [big, *clients]:
        thread.join(timeout=60)
    print(f"\nstop under load: exit {exit_code} after {took:.1f}s, {len(answers)} answers")
    assert not failures, f"requests left without an answer: {failures[:5]}"
    assert big_answer == [200], "the batch in flight at the stop was not answered"
    assert answers and set(answers) <= {200, 503}, answers
    assert exit_code == 0, container.logs()[-3000:]
    # A wide margin (see TORCHPOOL_DRAIN_TIMEOUT_S above): the drain ended when the
    # work in flight did, instead of being waited out.
    assert took < drain_s, f"the stop took {took:.1f}s, more than the {drain_s:g}s drain"
