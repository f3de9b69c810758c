"""Real tier: a real `torchpool serve` against a worker made of two bare DEALER
sockets, to see the exact REQUEST headers the gateway sends and how it treats
a worker's protocol version. No torch: the fake worker answers by hand."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from shared import protocol
from shared.config import ServeSettings
from shared.fingerprint import fingerprint
from tests.conftest import Server, free_port, wait_for


class FakeWorker:
    """Says hello (and ready), then records every REQUEST and answers it with ``answer``."""

    def __init__(self, endpoint: str, uid: str, version: int = protocol.VERSION) -> None:
        self.uid = uid
        self.ctx = zmq.Context()
        self.data = self._socket(endpoint, protocol.data_identity(uid))
        self.control = self._socket(endpoint, protocol.control_identity(uid))
        self.requests: list[tuple[dict[str, Any], bytes]] = []
        self.answer: tuple[dict[str, Any], bytes] = ({"code": protocol.OK, "fmt": "json"}, b"{}")
        self._stop = threading.Event()
        self._send_control(
            {"t": protocol.HELLO, "v": version, "slot": -1, "pid": 1, "host": "fake",
             "device": "cpu", "cores": [0], "threads": 1,
             "fingerprint": fingerprint(ServeSettings())}  # the demo model's
        )  # fmt: skip
        self._send_control(
            {"t": protocol.READY, "load_s": 0.0, "capacity": 4,
             "input_shape": None, "input_dtype": "float32", "rss_bytes": 1}
        )  # fmt: skip
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _socket(self, endpoint: str, identity: bytes) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        return sock

    def _send_control(self, header: dict[str, Any]) -> None:
        self.control.send(protocol.pack({**header, "uid": self.uid}))

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.data, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        beat: dict[str, Any] = {
            "t": protocol.HEARTBEAT,
            "batch_s": None,
            "batches": [],
            "rss_bytes": 1,
        }
        while not self._stop.is_set():
            events = dict(poller.poll(100))
            if self.control in events:
                self.control.recv_multipart()  # the gateway's beats
            if self.data in events:
                header, body = self.data.recv_multipart()
                request = protocol.unpack_header(header)
                self.requests.append((request, body))
                reply, payload = self.answer
                frames = [protocol.pack({"t": protocol.REPLY, "id": request["id"], **reply})]
                self.data.send_multipart(frames + ([payload] if payload else []))
            self._send_control(beat)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.data.close()
        self.control.close()
        self.ctx.term()


@pytest.fixture
def gateway(serve: Callable[..., Server]) -> Iterator[tuple[Server, str]]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = serve("--workers", "0", "--bind", endpoint, "--max-body-mb", "1", ready=None)
    wait_for(server.live, 60, "the gateway to answer")
    yield server, endpoint


@pytest.fixture
def fake_workers() -> Iterator[list[FakeWorker]]:
    workers: list[FakeWorker] = []
    yield workers
    for fake in workers:
        fake.close()


def test_request_carries_time_left_not_a_wall_clock_deadline(
    gateway: tuple[Server, str], fake_workers: list[FakeWorker]
) -> None:
    server, endpoint = gateway
    fake_workers.append(FakeWorker(endpoint, "fake-v2"))
    server.wait_ready(1, timeout_s=30)
    response = server.client.post(
        "/predict", json={"input_tensor": [[1.0]]}, headers={"x-request-timeout": "5"}
    )
    assert response.status_code == 200, response.text
    [(header, body)] = fake_workers[0].requests
    assert header["v"] == protocol.VERSION == 3
    assert "deadline_ms" not in header
    assert isinstance(header["timeout_ms"], int) and 4000 < header["timeout_ms"] <= 5000
    assert header["fmt"] == protocol.FMT_JSON and body == b'{"input_tensor":[[1.0]]}'


def test_worker_of_another_protocol_version_is_refused(
    gateway: tuple[Server, str], fake_workers: list[FakeWorker]
) -> None:
    server, endpoint = gateway
    fake_workers.append(FakeWorker(endpoint, "fake-v1", version=1))
    wait_for(lambda: "refusing remote worker" in server.log(), 30, "the refusal to be logged")
    assert server.health()["total_workers"] == 0
    assert server.client.post("/predict", json={"input_tensor": [[1.0]]}).status_code == 503
    assert not fake_workers[0].requests


@pytest.mark.parametrize(
    ("content_type", "sent"),
    [
        ("image/png", "image/png"),
        ("multipart/form-data; boundary=XyZ", "multipart/form-data; boundary=XyZ"),
        ("text/plain; charset=utf-8", "text/plain; charset=utf-8"),
        (None, "application/octet-stream"),
    ],
)
def test_other_bodies_pass_through_raw_with_their_content_type(
    gateway: tuple[Server, str],
    fake_workers: list[FakeWorker],
    content_type: str | None,
    sent: str,
) -> None:
    server, endpoint = gateway
    fake = FakeWorker(endpoint, "fake-raw")
    fake_workers.append(fake)
    server.wait_ready(1, timeout_s=30)
    body = b"\x89PNG\r\n\x1a\n not parsed by the gateway \x00\xff"
    headers = {} if content_type is None else {"content-type": content_type}
    fake.answer = ({"code": protocol.OK, "fmt": protocol.FMT_JSON}, b'{"prediction": 1}')
    answered = server.client.post("/predict", content=body, headers=headers)
    assert answered.status_code == 200 and answered.json() == {"prediction": 1}
    [(header, received)] = fake.requests
    assert header["fmt"] == protocol.FMT_RAW and header["ctype"] == sent
    assert received == body
    # The worker decides what the model takes; its refusal comes back as it was made.
    refusal = "this model takes a tensor, not image/png"
    fake.answer = ({"code": "unsupported_media_type", "message": refusal}, b"")
    refused = server.client.post("/predict", content=body, headers=headers)
    assert refused.status_code == 415
    assert refused.json() == {"error": refusal, "code": "unsupported_media_type"}


def test_raw_body_over_the_limit_is_refused_before_it_reaches_a_worker(
    gateway: tuple[Server, str], fake_workers: list[FakeWorker]
) -> None:
    server, endpoint = gateway
    fake_workers.append(FakeWorker(endpoint, "fake-big"))
    server.wait_ready(1, timeout_s=30)
    big = b"\0" * (2 * 1024 * 1024)  # --max-body-mb 1
    declared = server.client.post("/predict", content=big, headers={"content-type": "image/png"})
    assert declared.status_code == 413, declared.text

    def chunks() -> Iterator[bytes]:  # no Content-Length: refused while reading
        for _ in range(32):
            yield b"\0" * (64 * 1024)

    streamed = server.client.post(
        "/predict", content=chunks(), headers={"content-type": "audio/wav"}
    )
    assert streamed.status_code == 413, streamed.text
    assert fake_workers[0].requests == []
