"""The gRPC server's settings and lifecycle: flags, TLS, the drain on SIGTERM, and the
streaming GPT-2 example through tritonclient's start_stream/async_stream_infer.

The flag checks are the fast tier (in-process); the rest starts real servers."""

from __future__ import annotations

import concurrent.futures
import queue
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson
import pytest
import tritonclient.grpc as tgrpc
from grpc_health.v1 import health_pb2
from tritonclient.utils import InferenceServerException

from gateway.cli import EXIT_CONFIG, main
from shared.config import ConfigError, ServeSettings
from shared.flags import parse_settings
from tests.conftest import Server, free_port, wait_for
from tests.test_grpc import health_check

# --- flags ---------------------------------------------------------------------------


@pytest.mark.fast
def test_grpc_flags_from_the_command_line_and_the_environment(tmp_path: Path) -> None:
    assert parse_settings(ServeSettings, []).grpc_port is None  # off by default
    assert parse_settings(ServeSettings, ["--grpc-port", "8001"]).grpc_port == 8001
    from_env = parse_settings(ServeSettings, [], {"TORCHPOOL_GRPC_PORT": "9001"})
    assert from_env.grpc_port == 9001
    with pytest.raises(ConfigError, match="go together"):
        parse_settings(ServeSettings, ["--grpc-port", "1", "--grpc-tls-cert", "c.pem"])
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    with pytest.raises(ConfigError, match="only apply with --grpc-port"):
        parse_settings(ServeSettings, ["--grpc-tls-cert", str(cert), "--grpc-tls-key", str(key)])
    with pytest.raises(ConfigError, match="is not a TCP port"):
        parse_settings(ServeSettings, ["--grpc-port", "70000"])


@pytest.mark.fast
def test_a_taken_grpc_port_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--port", str(free_port()), "--grpc-port", str(port)])
    assert code == EXIT_CONFIG
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


# --- TLS and the drain ------------------------------------------------------------------


def self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


def test_tls_and_the_drain_on_sigterm(tmp_path: Path, serve: Callable[..., Server]) -> None:
    cert, key = self_signed(tmp_path)
    port = free_port()
    server = serve(
        "--handler", "tests.v2models:RowCounter", "--model-kwargs", '{"sleep_s": 2.0}',
        "--model-name", "slow", "--workers", "1", "--grpc-port", str(port),
        "--grpc-tls-cert", str(cert), "--grpc-tls-key", str(key),
    )  # fmt: skip
    address = f"localhost:{port}"
    client = tgrpc.InferenceServerClient(address, ssl=True, root_certificates=str(cert))
    plain = tgrpc.InferenceServerClient(address)
    four = tgrpc.InferInput("x", [1, 4], "FP32")
    four.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    try:
        assert client.is_server_ready()
        with pytest.raises(InferenceServerException):
            plain.is_server_live(client_timeout=5)  # no TLS, no answer
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            inflight = pool.submit(client.infer, "slow", [four])
            wait_for(lambda: server.health()["workers"][0]["inflight"] == 1, 30, "a busy worker")
            server.proc.send_signal(signal.SIGTERM)
            credentials = grpc.ssl_channel_credentials(cert.read_bytes())
            with grpc.secure_channel(address, credentials) as channel:
                not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
                wait_for(
                    lambda: health_check(channel, "") == not_serving,
                    10,
                    "health to say NOT_SERVING",
                )
            with pytest.raises(InferenceServerException) as refused:
                client.infer("slow", [four])
            assert str(refused.value.status()) == "StatusCode.UNAVAILABLE"
            assert refused.value.message() == "the server is shutting down"
            # The call in flight finishes with its answer.
            assert inflight.result(timeout=30).as_numpy("total").tolist() == [[4.0]]
        assert server.proc.wait(30) == 0
    finally:
        client.close()
        plain.close()


# --- the GPT-2-style example ------------------------------------------------------------

TOKENS = 12


def test_gpt2_example_streams_over_grpc(serve: Callable[..., Server]) -> None:
    port = free_port()
    kwargs = orjson.dumps({"max_new_tokens": TOKENS}).decode()
    server = serve(
        "--workers", "1", "--handler", "examples.text_generation:TextGenerator",
        "--model-kwargs", kwargs, "--model-name", "gpt", "--grpc-port", str(port),
        ready=None,
    )  # fmt: skip
    server.wait_ready(1, timeout_s=240)  # importing transformers is slow on a busy machine
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{port}")
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    prompt = tgrpc.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"Once upon a time"], dtype=np.object_))
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("gpt", [prompt], request_id="g", enable_empty_final_response=True)
        chars: list[str] = []
        while True:
            result, error = results.get(timeout=120)
            assert error is None, error
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
            text = result.as_numpy("text_output")
            assert text.dtype == np.object_ and text.shape == (1,)
            chars.append(text[0].decode())
    finally:
        client.stop_stream()
        client.close()
    assert len(chars) == TOKENS and all(len(c) == 1 for c in chars)
    whole = server.client.post("/v2/models/gpt/generate", json={"text_input": "Once upon a time"})
    assert whole.json()["text_output"] == "".join(chars)
