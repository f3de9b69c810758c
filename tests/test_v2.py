"""Real tier: the Open Inference Protocol (/v2) with the stock Triton client and raw HTTP.

The Triton client code is what its users write, unchanged; the answers are
compared with the demo model run in-process.
"""

from __future__ import annotations

import gzip
import json
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from shared import protocol
from shared.errors import ModelFailure, PayloadTooLarge, RequestError
from tests.conftest import Server, wait_for
from worker.codec import v2 as v2codec
from worker.codec.inputs import InputSpec
from worker.model.demo import build_demo_model

X = np.linspace(-1.0, 1.0, 3 * 16, dtype=np.float32).reshape(3, 16)
INFER = "/v2/models/demo/infer"


def in_process(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    with torch.inference_mode():
        result: np.ndarray[Any, Any] = build_demo_model()(torch.from_numpy(x)).numpy()
        return result


def close(got: Any, want: np.ndarray[Any, Any]) -> None:
    np.testing.assert_allclose(np.asarray(got, dtype=np.float32), want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def client(demo_server: Server) -> Iterator[triton.InferenceServerClient]:
    triton_client = triton.InferenceServerClient(f"127.0.0.1:{demo_server.port}")
    yield triton_client
    triton_client.close()


def fp32_input(x: np.ndarray[Any, Any], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("input__0", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def v2_request(data: Any, shape: list[int], datatype: str = "FP32", **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [{"name": "INPUT0", "shape": shape, "datatype": datatype, "data": data}],
        **extra,
    }


# --- the stock Triton client ----------------------------------------------------------


def test_triton_infer_binary(client: triton.InferenceServerClient) -> None:
    result = client.infer("demo", [fp32_input(X)], request_id="req-1")
    close(result.as_numpy("output__0"), in_process(X))
    response = result.get_response()
    assert response["model_name"] == "demo" and response["model_version"] == "1"
    assert response["id"] == "req-1"
    (output,) = response["outputs"]
    assert output["datatype"] == "FP32" and output["shape"] == [3, 4]
    assert output["parameters"]["binary_data_size"] == 3 * 4 * 4
    assert "data" not in output


def test_triton_infer_json(client: triton.InferenceServerClient) -> None:
    wanted = [triton.InferRequestedOutput("output__0", binary_data=False)]
    result = client.infer("demo", [fp32_input(X, binary=False)], outputs=wanted)
    close(result.as_numpy("output__0"), in_process(X))
    (output,) = result.get_response()["outputs"]
    assert len(output["data"]) == 3 * 4 and "parameters" not in output


def test_triton_infer_versioned_and_compressed(client: triton.InferenceServerClient) -> None:
    for algorithm in (None, "gzip", "deflate"):
        result = client.infer(
            "demo", [fp32_input(X)], model_version="1", request_compression_algorithm=algorithm
        )
        close(result.as_numpy("output__0"), in_process(X))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("demo", [fp32_input(X)], model_version="2")
    assert caught.value.status() == "404"


def test_triton_metadata_and_probes(client: triton.InferenceServerClient) -> None:
    server = client.get_server_metadata()
    assert server["name"] == "torchpool" and "binary_tensor_data" in server["extensions"]
    assert server["version"]
    model = client.get_model_metadata("demo")
    assert model["name"] == "demo" and model["versions"] == ["1"]
    assert model["platform"] == "pytorch"
    assert model["inputs"] == [{"name": "input__0", "datatype": "FP32", "shape": [-1, 16]}]
    assert model["outputs"] == [{"name": "output__0", "datatype": "FP32", "shape": [-1, 4]}]
    assert client.get_model_metadata("demo", "1") == model
    config = client.get_model_config("demo")
    assert config["max_batch_size"] == 8
    assert config["input"] == [{"name": "input__0", "data_type": "TYPE_FP32", "dims": [16]}]
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("demo") and client.is_model_ready("demo", "1")
    assert not client.is_model_ready("resnet")
    assert not client.is_model_ready("demo", "7")


def test_triton_unknown_model(client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.infer("resnet", [fp32_input(X)])
    assert caught.value.status() == "404"
    assert "unknown model 'resnet'" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("resnet")
    assert caught.value.status() == "404"


def test_triton_wrong_shape(client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.infer("demo", [fp32_input(np.zeros((2, 15), dtype=np.float32))])
    assert caught.value.status() == "400"
    assert "expected shape [N, 16], received [2, 15]" in caught.value.message()


# --- raw HTTP: the JSON shapes ------------------------------------------------------------


def test_json_flat_and_nested_data(demo_server: Server) -> None:
    want = in_process(X)
    for data in (X.ravel().tolist(), X.tolist()):
        response = demo_server.client.post(INFER, json=v2_request(data, [3, 16], id="x"))
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        assert "inference-header-content-length" not in response.headers
        document = response.json()
        assert set(document) == {"model_name", "model_version", "id", "outputs"}
        (output,) = document["outputs"]
        assert output["name"] == "output__0" and output["shape"] == [3, 4]
        close(np.reshape(output["data"], (3, 4)), want)


def test_fp64_and_int64_inputs_are_converted(demo_server: Server) -> None:
    integers = np.arange(-8, 8, dtype=np.int64).reshape(1, 16)
    want = in_process(integers.astype(np.float32))
    for datatype, data in (("INT64", integers.tolist()), ("FP64", integers.astype(float).tolist())):
        response = demo_server.client.post(INFER, json=v2_request(data, [1, 16], datatype))
        assert response.status_code == 200, response.text
        close(np.reshape(response.json()["outputs"][0]["data"], (1, 4)), want)


def test_binary_request_built_by_hand(demo_server: Server) -> None:
    """FP16 bytes after the JSON, no content type: converted to the model's float32."""
    x = X.astype("<f2")
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input__0",
                    "shape": [3, 16],
                    "datatype": "FP16",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "output__0", "parameters": {"binary_data": True}}],
        }
    ).encode()
    response = demo_server.client.post(
        INFER,
        content=head + x.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    json_len = int(response.headers["inference-header-content-length"])
    document = json.loads(response.content[:json_len])
    assert document["outputs"][0]["parameters"]["binary_data_size"] == 3 * 4 * 4
    got = np.frombuffer(response.content[json_len:], dtype="<f4").reshape(3, 4)
    close(got, in_process(x.astype(np.float32)))


def test_binary_output_for_a_json_request(demo_server: Server) -> None:
    body = v2_request(X.tolist(), [3, 16], parameters={"binary_data_output": True})
    response = demo_server.client.post(
        INFER,
        content=gzip.compress(json.dumps(body).encode()),
        headers={"content-encoding": "gzip"},
    )
    assert response.status_code == 200, response.text
    json_len = int(response.headers["inference-header-content-length"])
    close(np.frombuffer(response.content[json_len:], dtype="<f4").reshape(3, 4), in_process(X))


ROW = [0.5] * 16
ROW_JSON = json.dumps(v2_request(ROW, [1, 16])).encode()


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b'{"inputs": [', "not valid JSON"),
        (
            b'{"inputs": [{"name": "a", "shape": [1, 16], "datatype": "FP32", "data": [NaN]}]}',
            "not valid JSON",
        ),
        (b"[]", "must be an object"),
        (b'{"id": "a"}', "inputs list"),
        (b'{"id": 7, "inputs": []}', "id must be a string"),
        (json.dumps({"inputs": [v2_request(ROW, [1, 16])["inputs"][0]] * 2}), "one input tensor"),
        (json.dumps(v2_request(["a"] * 16, [1, 16], "BYTES")), "BYTES"),
        (json.dumps(v2_request(ROW, [1, 16], "FP8")), "unknown datatype 'FP8'"),
        (json.dumps(v2_request(ROW, [1, 15])), "needs 15 values, data holds 16"),
        (json.dumps(v2_request(ROW, [0, 16])), "empty"),
        (json.dumps(v2_request(ROW, [16])), "expected shape [N, 16], received [16]"),
        (json.dumps(v2_request([1.5] * 16, [1, 16], "INT32")), "fractions"),
        (json.dumps(v2_request([300] * 16, [1, 16], "INT8")), "does not fit int8"),
        (json.dumps(v2_request([[1, 2], [3]], [1, 16])), "ragged"),
        (json.dumps(v2_request(["1"] * 16, [1, 16])), "only numbers"),
        (json.dumps(v2_request(ROW, [1, 16], outputs=[{"name": "scores"}])), "unknown output"),
        (json.dumps({"inputs": [{"name": "a", "shape": [1, 16], "datatype": "FP32"}]}), "no data"),
    ],
)
def test_bad_requests_are_400_with_only_an_error(
    demo_server: Server, body: bytes | str, needle: str
) -> None:
    response = demo_server.client.post(INFER, content=body)
    assert response.status_code == 400, response.text
    document = response.json()
    assert list(document) == ["error"] and needle in document["error"], document


@pytest.mark.parametrize(
    ("headers", "body", "needle"),
    [
        ({"Inference-Header-Content-Length": "abc"}, b"{}", "positive byte count"),
        ({"Inference-Header-Content-Length": "100"}, b"{}", "exceeds the body"),
        ({"content-encoding": "br"}, b"{}", "not supported"),
        ({"content-encoding": "gzip"}, b"{}", "not valid gzip"),
        ({}, b"", "empty body"),
        (
            {"Inference-Header-Content-Length": str(len(ROW_JSON))},
            ROW_JSON + b"\0" * 8,
            "8 bytes follow the JSON, but no input has binary data",
        ),
    ],
)
def test_bad_binary_framing(
    demo_server: Server, headers: dict[str, str], body: bytes, needle: str
) -> None:
    response = demo_server.client.post(INFER, content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]


def test_routes_and_unknown_models(demo_server: Server) -> None:
    get = demo_server.client.get
    assert get("/v2").json()["name"] == "torchpool"
    assert get("/v2/health/live").status_code == 200
    assert get("/v2/health/ready").json() == {"ready": True}
    assert get("/v2/models/demo/ready").json() == {"name": "demo", "ready": True}
    assert get("/v2/models/demo/versions/1/ready").status_code == 200
    for path in ("/v2/models/resnet", "/v2/models/demo/versions/2", "/v2/models/resnet/ready"):
        response = get(path)
        assert response.status_code == 404 and list(response.json()) == ["error"], path
    response = demo_server.client.post("/v2/models/resnet/infer", json=v2_request(ROW, [1, 16]))
    assert response.status_code == 404
    assert response.json() == {"error": "unknown model 'resnet'; served: demo"}


def test_without_ready_workers_everything_is_503_with_an_error(
    serve: Callable[..., Server],
) -> None:
    server = serve("--workers", "0", ready=None)

    def live() -> bool:
        try:
            return server.get("/v2/health/live").status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(live, 30, "the gateway to answer")
    for method, path in (
        ("GET", "/v2/health/ready"),
        ("GET", "/v2/models/demo/ready"),
        ("GET", "/v2/models/demo"),
        ("POST", "/v2/models/demo/infer"),
    ):
        response = server.client.request(method, path, json=v2_request(ROW, [1, 16]))
        assert response.status_code == 503, (path, response.text)
        assert isinstance(response.json()["error"], str), path
    assert "Retry-After" in response.headers


# --- batching, dict outputs and BYTES, with a handler ---------------------------------------


@pytest.fixture(scope="module")
def counter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One worker serving tests.v2models:RowCounter, whose forward pass takes 0.5 s."""
    args = ["--handler", "tests.v2models:RowCounter", "--model-kwargs", '{"sleep_s": 0.5}']
    args += ["--model-name", "counter", "--workers", "1", "--max-batch-size", "16"]
    server = Server(args, tmp_path_factory.mktemp("counter") / "serve.log")
    try:
        yield server.wait_ready(1)
    finally:
        server.stop()


def test_v2_requests_batch_with_predict_requests(counter: Server) -> None:
    """A blocker holds the worker; 3 v2 and 3 /predict requests queue and run as one batch."""
    url = counter.url
    answers: dict[str, Any] = {}

    def post(key: str, path: str, body: dict[str, Any]) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            answers[key] = http.post(path, json=body)

    def start(key: str, path: str, body: dict[str, Any]) -> threading.Thread:
        thread = threading.Thread(target=post, args=(key, path, body))
        thread.start()
        return thread

    threads = [start("blocker", "/predict", {"input_tensor": [[0, 0, 0, 0]]})]
    wait_for(
        lambda: counter.health()["workers"][0]["state"] == "busy", 10, "the blocker to be sent"
    )
    for i in range(3):
        v2_body = v2_request([i, 1, 1, 1], [1, 4], "INT32", id=f"v2-{i}")
        threads.append(start(f"v2-{i}", "/v2/models/counter/infer", v2_body))
        threads.append(start(f"predict-{i}", "/predict", {"input_tensor": [[i, 2, 2, 2]]}))
    for thread in threads:
        thread.join(30)
    rows = []
    for i in range(3):
        response = answers[f"v2-{i}"]
        assert response.status_code == 200, response.text
        document = response.json()
        assert document["id"] == f"v2-{i}" and document["model_name"] == "counter"
        outputs = {o["name"]: o for o in document["outputs"]}
        assert outputs["total"]["data"] == [i + 3.0] and outputs["total"]["datatype"] == "FP32"
        assert outputs["rows"]["datatype"] == "INT64"
        rows.append(outputs["rows"]["data"][0])
        predicted = answers[f"predict-{i}"].json()["prediction"]
        assert predicted["total"] == [[i + 6.0]]
    # More rows than v2 requests: the batch held /predict requests too.
    assert max(rows) > 3, rows


def test_dict_outputs_and_bytes_for_a_handler(counter: Server) -> None:
    triton_client = triton.InferenceServerClient(f"127.0.0.1:{counter.port}")
    try:
        metadata = triton_client.get_model_metadata("counter")
        assert metadata["outputs"] == [
            {"name": "total", "datatype": "FP32", "shape": [-1, 1]},
            {"name": "rows", "datatype": "INT64", "shape": [-1, 1]},
        ]
        strings = triton.InferInput("text", [1, 4], "BYTES")
        strings.set_data_from_numpy(np.array([[b"ab", b"abc", b"", b"x"]], dtype=np.object_))
        wanted = [triton.InferRequestedOutput("total")]
        result = triton_client.infer("counter", [strings], outputs=wanted)
        assert result.as_numpy("total").tolist() == [[6.0]]
        assert result.as_numpy("rows") is None
    finally:
        triton_client.close()
    response = counter.client.post(
        "/v2/models/counter/infer", json=v2_request([["ab", "", "x", "four"]], [1, 4], "BYTES")
    )
    assert response.status_code == 200, response.text
    assert {o["name"]: o["data"] for o in response.json()["outputs"]}["total"] == [7.0]


def test_bytes_length_prefixes_are_checked(counter: Server) -> None:
    raw = struct.pack("<I", 10) + b"abc"
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "text",
                    "shape": [1, 1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    response = counter.client.post(
        "/v2/models/counter/infer",
        content=head + raw,
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert response.status_code == 400
    assert "runs past the data" in response.json()["error"]


# --- fast tier: the worker's v2 codec in-process ------------------------------------------

LIMIT = 1 << 20


def decode(
    body: bytes, json_len: int | None = None, dtype: torch.dtype = torch.float32, **header: Any
) -> tuple[torch.Tensor, v2codec.V2Context]:
    fmt = protocol.FMT_V2_JSON if json_len is None else protocol.FMT_V2_BINARY
    tensor, context = v2codec.V2Codec(InputSpec(dtype, None, LIMIT)).decode(
        {"fmt": fmt, "json_len": json_len, "model": "m", "version": "1", **header}, body
    )
    assert isinstance(tensor, torch.Tensor)
    return tensor, context


def binary_body(array: np.ndarray[Any, Any], datatype: str) -> tuple[bytes, int]:
    spec = {"name": "x", "shape": list(array.shape), "datatype": datatype}
    head = json.dumps(
        {"inputs": [{**spec, "parameters": {"binary_data_size": array.nbytes}}]}
    ).encode()
    return head + array.tobytes(), len(head)


def test_binary_input_is_a_view_of_the_body() -> None:
    body, json_len = binary_body(X, "FP32")
    frame = memoryview(body)
    tensor, context = decode(frame, json_len)  # type: ignore[arg-type]
    assert tensor.shape == (3, 16) and torch.equal(tensor, torch.from_numpy(X))
    start = np.frombuffer(body, dtype=np.uint8).ctypes.data
    assert tensor.data_ptr() == start + json_len  # no copy
    assert context.wanted is None and not context.binary_default


def test_datatypes_convert_to_the_model_dtype() -> None:
    bf16 = torch.tensor([[1.5, -2.0]], dtype=torch.bfloat16)
    body, json_len = binary_body(bf16.view(torch.int16).numpy(), "BF16")
    assert decode(body, json_len)[0].tolist() == [[1.5, -2.0]]
    flags = json.dumps(v2_request([[True, False]], [1, 2], "BOOL")).encode()
    assert decode(flags)[0].tolist() == [[1.0, 0.0]]
    big = json.dumps(v2_request([2**40, -1], [1, 2], "INT64")).encode()
    assert decode(big, dtype=torch.int64)[0].tolist() == [[2**40, -1]]
    with pytest.raises(RequestError, match="does not fit uint8"):
        decode(json.dumps(v2_request([-1, 2], [1, 2], "UINT8")).encode())


def test_compressed_body_is_limited() -> None:
    bomb = gzip.compress(b" " * (4 * LIMIT))
    with pytest.raises(PayloadTooLarge):
        decode(bomb, encoding="gzip")
    body = json.dumps(v2_request([1, 2], [1, 2])).encode()
    assert decode(gzip.compress(body), encoding="gzip")[0].tolist() == [[1.0, 2.0]]


def context(wanted: tuple[v2codec.Wanted, ...] | None = None, binary: bool = False) -> Any:
    return v2codec.V2Context("m", "1", "id-1", wanted, binary)


def test_encode_tuple_outputs_json_and_binary() -> None:
    result = (torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16), torch.tensor([[3]]))
    body, fmt, extra = v2codec.encode_reply(context(), result)
    assert fmt == protocol.FMT_V2_JSON and extra == {}
    document = json.loads(body)
    assert document["id"] == "id-1"
    assert [(o["name"], o["datatype"], o["data"]) for o in document["outputs"]] == [
        ("output__0", "BF16", [1.0, 2.0]),
        ("output__1", "INT64", [3]),
    ]
    wanted = (v2codec.Wanted("output__1", binary=True),)
    body, fmt, extra = v2codec.encode_reply(context(wanted), result)
    assert fmt == protocol.FMT_V2_BINARY
    document = json.loads(body[: extra["json_len"]])
    assert [o["name"] for o in document["outputs"]] == ["output__1"]
    assert np.frombuffer(body[extra["json_len"] :], dtype="<i8").tolist() == [3]


def test_outputs_v2_cannot_carry_are_model_failures() -> None:
    with pytest.raises(ModelFailure, match="v2 outputs must be tensors"):
        v2codec.encode_reply(context(), {"label": "cat"})
    with pytest.raises(ModelFailure, match="complex64"):
        v2codec.encode_reply(context(), torch.zeros(1, 2, dtype=torch.complex64))
    assert v2codec.describe_outputs({"a": torch.zeros(1, 3), "b": torch.zeros(1)}) == [
        {"name": "a", "dtype": "float32", "shape": [-1, 3]},
        {"name": "b", "dtype": "float32", "shape": [-1]},
    ]
    assert v2codec.describe_outputs("text") is None
