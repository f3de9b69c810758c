"""Real tier for the worker alone: a real `python -m worker` against a ROUTER
bound by the test, speaking the wire protocol of :mod:`shared.protocol`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch
import zmq

from shared import protocol
from worker.model.demo import build_demo_model

ROOT = Path(__file__).resolve().parent.parent
UID = "0.1"
BOOT_TIMEOUT_S = 60.0


class FakeGateway:
    """A bound ROUTER that records what the worker says, by channel."""

    def __init__(self, folder: Path) -> None:
        self.endpoint = f"ipc://{folder}/gateway.sock"
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(self.endpoint)
        self.control: list[dict[str, Any]] = []
        self.replies: dict[int, list[bytes]] = {}

    def pump(self, timeout_s: float) -> None:
        """Read whatever arrives within ``timeout_s``."""
        if not self.router.poll(round(timeout_s * 1000)):
            return
        while True:
            try:
                identity, *frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            header = protocol.unpack_header(frames[0])
            if identity == protocol.control_identity(UID):
                self.control.append(header)
            else:
                assert identity == protocol.data_identity(UID)
                self.replies[header["id"]] = frames

    def wait_control(self, kind: str, timeout_s: float = BOOT_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            for message in self.control:
                if message["t"] == kind:
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind} within {timeout_s}s; got {self.control}")
            self.pump(min(left, 0.2))

    def wait_reply(self, request_id: int, timeout_s: float = 30.0) -> list[bytes]:
        deadline = time.monotonic() + timeout_s
        while request_id not in self.replies:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no reply to request {request_id} within {timeout_s}s")
            self.pump(min(left, 0.2))
        return self.replies.pop(request_id)

    def request(self, request_id: int, body: bytes, fmt: str = protocol.FMT_JSON) -> None:
        header = {"t": protocol.REQUEST, "v": protocol.VERSION, "id": request_id, "fmt": fmt}
        self.router.send_multipart([protocol.data_identity(UID), protocol.pack(header), body])

    def to_control(self, message: dict[str, Any]) -> None:
        self.router.send_multipart([protocol.control_identity(UID), protocol.pack(message)])

    def close(self) -> None:
        self.router.close()
        self.ctx.term()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[FakeGateway]:
    fake = FakeGateway(tmp_path)
    yield fake
    fake.close()


def spawn(gateway: FakeGateway, *flags: str) -> subprocess.Popen[bytes]:
    core = min(os.sched_getaffinity(0))
    return subprocess.Popen(
        [
            sys.executable, "-m", "worker", "--connect", gateway.endpoint, "--uid", UID,
            "--slot", "0", "--cores", str(core), "--heartbeat-s", "0.2", *flags,
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )  # fmt: skip


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_boot_serve_and_stop(gateway: FakeGateway) -> None:
    proc = spawn(gateway, "--input-shape", "16", "--max-batch-size", "8")
    try:
        hello = gateway.wait_control(protocol.HELLO)
        assert hello["uid"] == UID and hello["pid"] == proc.pid and hello["slot"] == 0
        assert hello["device"] == "cpu" and len(hello["cores"]) == 1 and hello["threads"] == 1
        gateway.wait_control(protocol.LOADING)
        ready = gateway.wait_control(protocol.READY)
        assert ready["input_shape"] == [16] and ready["input_dtype"] == "float32"
        assert ready["capacity"] == 16 and ready["signature"]["source"] == "demo"
        # Fields no gateway reads are not sent (the device is HELLO's).
        assert not {"model_name", "device"} & set(ready)
        gateway.to_control({"t": protocol.BEAT})
        beat = gateway.wait_control(protocol.HEARTBEAT, timeout_s=5)
        assert 10_000_000 < beat["rss_bytes"] < 8_000_000_000
        assert beat["cuda_allocated_bytes"] is None

        rows = [[(i * 16 + j) / 100 for j in range(16)] for i in range(3)]
        gateway.request(1, orjson.dumps({"input_tensor": rows}))
        header, body = gateway.wait_reply(1)
        assert protocol.unpack_header(header)["code"] == protocol.OK
        with torch.inference_mode():
            want = build_demo_model()(torch.tensor(rows))
        got = torch.tensor(orjson.loads(body)["prediction"])
        torch.testing.assert_close(got, want)

        gateway.request(2, b'{"input_tensor": [[1, "x"]]}')
        (bad,) = gateway.wait_reply(2)
        assert protocol.unpack_header(bad)["code"] == "bad_request"
        gateway.request(3, orjson.dumps({"input_tensor": rows[:1]}))
        header, _ = gateway.wait_reply(3)
        assert protocol.unpack_header(header)["code"] == protocol.OK

        gateway.to_control({"t": protocol.STOP, "reason": "test"})
        bye = gateway.wait_control(protocol.BYE, timeout_s=10)
        assert bye["reason"] == "test"
        assert proc.wait(10) == 0
    finally:
        stop_process(proc)


def test_missing_model_file_fails_with_exit_3(gateway: FakeGateway, tmp_path: Path) -> None:
    proc = spawn(gateway, "--model", str(tmp_path / "absent.pt"))
    try:
        error = gateway.wait_control(protocol.ERROR)
        assert error["code"] == "model_load_failed" and error["fatal"] is True
        assert "does not exist" in error["message"]
        assert proc.wait(30) == protocol.EXIT_LOAD_FAILED
        assert proc.stderr is not None
        stderr = proc.stderr.read().decode()
        assert "torchpool worker: cannot load model:" in stderr
        assert "Traceback" not in stderr
    finally:
        stop_process(proc)


def test_sigterm_finishes_with_bye_and_exit_0(gateway: FakeGateway) -> None:
    proc = spawn(gateway, "--max-batch-size", "1")
    try:
        gateway.wait_control(protocol.READY)
        proc.terminate()
        bye = gateway.wait_control(protocol.BYE, timeout_s=10)
        assert bye["reason"] == "signal SIGTERM"
        assert proc.wait(10) == 0
    finally:
        stop_process(proc)
