"""The gateway never imports torch, directly or through a dependency."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.conftest import ROOT, Server

# Runs in a fresh interpreter: the test process itself has torch loaded.
PROGRAM = """
import sys, time
from fastapi.testclient import TestClient
from gateway.api.app import create_app
from shared.config import ServeSettings

# With the gRPC server on (port 0: any free one), which loads grpcio and protobuf too.
app = create_app(ServeSettings(workers=1, grpc_port=0))
with TestClient(app) as client:
    deadline = time.monotonic() + 90
    while client.get("/health/ready").status_code != 200:
        assert time.monotonic() < deadline, "worker never became ready"
        time.sleep(0.05)
    reply = client.post("/predict", json={"input_tensor": [[0.0] * 16]})
    assert reply.status_code == 200, reply.text
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print("TORCH_MODULES", loaded)
"""


def test_started_app_has_no_torch_in_sys_modules() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr
    assert "TORCH_MODULES []" in result.stdout, result.stdout


def test_running_gateway_maps_no_libtorch(serve: Callable[..., Server]) -> None:
    server = serve("--workers", "1")
    assert server.predict({"input_tensor": [[0.0] * 16]}).status_code == 200
    maps = Path(f"/proc/{server.pid}/maps").read_text()
    assert "libtorch" not in maps
    assert "libc10" not in maps
    # The worker, by contrast, does load it: the check can see libtorch when it is there.
    worker_pid = server.worker_pids()[0]
    assert "libtorch" in Path(f"/proc/{worker_pid}/maps").read_text()
