"""Fast tier: request bodies to tensors and results to reply bodies, every error case."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgpack
import orjson
import pytest
import torch

from shared import protocol
from shared.errors import (
    InvalidValue,
    ModelFailure,
    PayloadTooLarge,
    RequestError,
    ShapeMismatch,
)
from worker.codec import predict as codec
from worker.codec import v2 as v2codec
from worker.codec.inputs import InputSpec, Preprocess
from worker.serve.loop import deadline_of

pytestmark = pytest.mark.fast

LIMIT = 1 << 20


def decode(
    fmt: str,
    body: bytes,
    shape: tuple[int, ...] | None = None,
    dtype: torch.dtype = torch.float32,
    max_bytes: int = LIMIT,
    preprocess: Preprocess | None = None,
) -> Any:
    spec = InputSpec(dtype, shape, max_bytes, preprocess)
    format_codec = codec.JsonCodec(spec) if fmt == protocol.FMT_JSON else codec.MsgpackCodec(spec)
    return format_codec.decode({"fmt": fmt}, body)[0]


def decode_json(
    body: bytes, shape: tuple[int, ...] | None = (2,), dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    tensor: torch.Tensor = decode(protocol.FMT_JSON, body, shape, dtype)
    return tensor


def decode_msgpack(
    value: Any, shape: tuple[int, ...] | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    tensor: torch.Tensor = decode(
        protocol.FMT_MSGPACK, protocol.pack({"input_tensor": value}), shape, dtype
    )
    return tensor


def encode(fmt: str, result: Any) -> bytes:
    spec = InputSpec(torch.float32, None, LIMIT)
    format_codec = codec.JsonCodec(spec) if fmt == protocol.FMT_JSON else codec.MsgpackCodec(spec)
    body, reply_fmt, extra = format_codec.encode(None, result)
    assert reply_fmt == fmt and extra == {}
    return body


def test_json_rows() -> None:
    tensor = decode_json(b'{"input_tensor": [[1, 2.5], [true, -3]]}')
    assert tensor.dtype == torch.float32
    torch.testing.assert_close(tensor, torch.tensor([[1.0, 2.5], [1.0, -3.0]]))


def test_json_to_integer_dtype() -> None:
    tensor = decode_json(b'{"input_tensor": [[1, 2.0]]}', dtype=torch.int64)
    assert tensor.dtype == torch.int64 and tensor.tolist() == [[1, 2]]
    with pytest.raises(RequestError, match="fractions"):
        decode_json(b'{"input_tensor": [[1, 2.5]]}', dtype=torch.int64)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b'{"input_tensor": [[NaN, 1]]}', "not valid JSON"),
        (b'{"input_tensor": [[Infinity, 1]]}', "not valid JSON"),
        (b'{"input_tensor": [[1e400, 1]]}', "not valid JSON"),
        (b'{"input_tensor": [[1, 2]]', "not valid JSON"),
        (b"[[1, 2]]", "must be an object"),
        (b'{"inputs": [[1, 2]]}', '"input_tensor"'),
        (b'{"input_tensor": [["1.5", 2]]}', "string"),
        (b'{"input_tensor": [[1, null]]}', "only numbers"),
        (b'{"input_tensor": [[1, {"a": 1}]]}', "only numbers"),
        (b'{"input_tensor": [[1, 2], [3]]}', "ragged"),
        (b'{"input_tensor": [[1, 2], 3]}', "ragged"),
        (b'{"input_tensor": 3}', "first dimension is the batch"),
        (b'{"input_tensor": "abc"}', "first dimension is the batch"),
        (b'{"input_tensor": []}', "empty"),
        (b'{"input_tensor": [[]]}', "empty"),
    ],
)
def test_json_bad_requests(body: bytes, needle: str) -> None:
    with pytest.raises(RequestError) as info:
        decode_json(body, shape=None)
    assert type(info.value) is RequestError and info.value.status == 400
    assert needle in info.value.message


def test_json_body_over_the_limit() -> None:
    with pytest.raises(PayloadTooLarge):
        decode(protocol.FMT_JSON, b'{"input_tensor": [[1]]}', max_bytes=4)


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ShapeMismatch) as info:
        decode_json(orjson.dumps({"input_tensor": [[0.0] * 15] * 2}), shape=(16,))
    err = info.value
    assert err.status == 422 and err.code == "shape_mismatch"
    assert err.message == "expected shape [N, 16], received [2, 15]"
    assert err.details == {"expected": [-1, 16], "received": [2, 15]}


def test_shape_wildcards_and_rank() -> None:
    assert decode_json(b'{"input_tensor": [[[1, 2, 3]]]}', shape=(-1, 3)).shape == (1, 1, 3)
    with pytest.raises(ShapeMismatch, match=r"expected shape \[N, \*, 3\], received \[1, 3\]"):
        decode_json(b'{"input_tensor": [[1, 2, 3]]}', shape=(-1, 3))


@pytest.mark.parametrize("dtype", sorted(protocol.DTYPE_SIZES))
def test_msgpack_round_trip(dtype: str) -> None:
    source = (torch.arange(6) % 2 == 0) if dtype == "bool" else torch.arange(6)
    tensor = source.reshape(2, 3).to(getattr(torch, dtype))
    wire = codec.tensor_to_wire(tensor)
    assert wire["dtype"] == dtype and wire["shape"] == [2, 3]
    back = codec.tensor_from_wire(wire, LIMIT)
    assert back.dtype == tensor.dtype
    assert torch.equal(back.to(torch.float64), tensor.to(torch.float64))
    converted = decode_msgpack(wire)
    assert converted.dtype == torch.float32 and converted.tolist() == tensor.float().tolist()


def test_msgpack_list_and_errors() -> None:
    assert decode_msgpack([[1, 2]]).tolist() == [[1.0, 2.0]]
    bad = {"dtype": "float32", "shape": [2, 2], "data": b"\x00" * 12}
    with pytest.raises(RequestError, match="need 16"):
        decode_msgpack(bad)
    with pytest.raises(RequestError, match="empty"):
        decode_msgpack({"dtype": "float32", "shape": [0, 4], "data": b""})
    with pytest.raises(RequestError, match="scalar"):
        decode_msgpack({"dtype": "float32", "shape": [], "data": b"\x00" * 4})
    with pytest.raises(ShapeMismatch):
        decode_msgpack(codec.tensor_to_wire(torch.zeros(2, 3)), shape=(4,))
    with pytest.raises(RequestError, match="not valid msgpack"):
        decode(protocol.FMT_MSGPACK, b"\xc1")
    with pytest.raises(PayloadTooLarge):
        big = codec.tensor_to_wire(torch.zeros(64, 64))
        decode(protocol.FMT_MSGPACK, protocol.pack({"input_tensor": big}), max_bytes=1000)


def test_preprocess_errors_are_400() -> None:
    def preprocess(payload: Any, content_type: str) -> torch.Tensor:
        raise KeyError("image")

    with pytest.raises(RequestError, match="preprocess rejected the input: KeyError"):
        decode(protocol.FMT_JSON, b'{"input_tensor": {"x": 1}}', preprocess=preprocess)


def test_encode_json_structures() -> None:
    result = {
        "logits": torch.tensor([[1.5, 2.0]], dtype=torch.bfloat16),
        "pair": (torch.tensor([1, 2]), torch.tensor(3.0)),
        "label": "cat",
    }
    body = orjson.loads(encode(protocol.FMT_JSON, result))
    assert body == {"prediction": {"logits": [[1.5, 2.0]], "pair": [[1, 2], 3.0], "label": "cat"}}
    transposed = torch.arange(6.0).reshape(2, 3).T
    body = orjson.loads(encode(protocol.FMT_JSON, transposed))
    assert body["prediction"] == transposed.tolist()


def test_encode_msgpack_tensor_maps() -> None:
    out = {"y": torch.tensor([[1.0, 2.0]], dtype=torch.float16), "n": 3}
    body = msgpack.unpackb(encode(protocol.FMT_MSGPACK, out))
    wire = body["prediction"]["y"]
    assert wire["dtype"] == "float16" and wire["shape"] == [1, 2]
    assert codec.tensor_from_wire(wire, LIMIT).tolist() == [[1.0, 2.0]]
    assert body["prediction"]["n"] == 3


def test_unencodable_output_is_a_model_failure() -> None:
    with pytest.raises(ModelFailure):
        encode(protocol.FMT_JSON, object())


# --- numbers that do not wrap: the same rule on every path -----------------------


def v2_decode(datatype: str, data: list[Any], dtype: torch.dtype) -> torch.Tensor:
    request = {"inputs": [{"name": "x", "shape": [1, len(data)], "datatype": datatype}]}
    request["inputs"][0]["data"] = data
    spec = InputSpec(dtype, None, LIMIT)
    tensor, _ = v2codec.V2Codec(spec).decode({"fmt": protocol.FMT_V2_JSON}, orjson.dumps(request))
    assert isinstance(tensor, torch.Tensor)
    return tensor


@pytest.mark.parametrize(
    ("dtype", "values", "needle"),
    [
        (torch.int8, [1, 300], "300, which does not fit int8 [-128, 127]"),
        (torch.uint8, [-1, 2], "-1, which does not fit uint8 [0, 255]"),
        (torch.int32, [2**31], "2147483648, which does not fit int32"),
        (torch.int64, [2**63], "9223372036854775808, which does not fit int64"),
        (torch.bool, [0, 2], "2, which does not fit bool [0, 1]"),
        (torch.int64, [1, 2.5], "fractions (2.5) but the model takes int64"),
        (torch.float16, [1, 70000.0], "70000.0, which does not fit float16"),
    ],
)
def test_values_the_dtype_cannot_hold_are_422_everywhere(
    dtype: torch.dtype, values: list[Any], needle: str
) -> None:
    paths: dict[str, Callable[[], torch.Tensor]] = {
        "json": lambda: decode_json(orjson.dumps({"input_tensor": [values]}), None, dtype),
        "msgpack list": lambda: decode_msgpack([values], dtype=dtype),
        "msgpack tensor": lambda: decode_msgpack(
            codec.tensor_to_wire(torch.tensor([values], dtype=torch.float64)), dtype=dtype
        ),
        "v2 as the model's dtype": lambda: v2_decode("FP64", values, dtype),
    }
    for path, run in paths.items():
        with pytest.raises(InvalidValue) as info:
            run()
        assert info.value.status == 422 and info.value.code == "invalid_value", path
        assert needle in info.value.message, (path, info.value.message)
        assert info.value.details["dtype"] == str(dtype).removeprefix("torch."), path


def test_float_tensor_to_an_integer_model_keeps_whole_numbers_only() -> None:
    whole = codec.tensor_to_wire(torch.tensor([[1.0, -7.0]]))
    assert decode_msgpack(whole, dtype=torch.int64).tolist() == [[1, -7]]
    with pytest.raises(InvalidValue, match=r"fractions \(0.5\)"):
        decode_msgpack(codec.tensor_to_wire(torch.tensor([[0.5, 1.0]])), dtype=torch.int64)
    wide = codec.tensor_to_wire(torch.tensor([[1000]], dtype=torch.int64))
    with pytest.raises(InvalidValue, match="1000, which does not fit int8"):
        decode_msgpack(wide, dtype=torch.int8)
    # The declared v2 datatype is checked too, before any conversion.
    with pytest.raises(RequestError, match="does not fit int8"):
        v2_decode("INT8", [1, 128], torch.float32)


def test_values_in_range_convert_exactly() -> None:
    big = [2**62, -(2**62)]
    assert decode_json(orjson.dumps({"input_tensor": [big]}), None, torch.int64).tolist() == [big]
    assert decode_json(b'{"input_tensor": [[255, 0]]}', None, torch.uint8).tolist() == [[255, 0]]
    assert decode_json(b'{"input_tensor": [[true, 0]]}', None, torch.bool).tolist() == [
        [True, False]
    ]
    assert v2_decode("INT64", big, torch.int64).tolist() == [big]


# --- float16 and bfloat16 outputs on every reply format -------------------------


HALVES = [torch.float16, torch.bfloat16]
VALUES = [[0.1, -2.5, 65504.0 / 256]]


@pytest.mark.parametrize("dtype", HALVES)
def test_half_outputs_in_predict_json_and_msgpack(dtype: torch.dtype) -> None:
    tensor = torch.tensor(VALUES, dtype=dtype)
    # JSON numbers that read back as exactly the model's values.
    prediction = orjson.loads(encode(protocol.FMT_JSON, tensor))["prediction"]
    assert torch.equal(torch.tensor(prediction, dtype=dtype), tensor)
    assert orjson.loads(encode(protocol.FMT_JSON, tensor[0, 1]))["prediction"] == -2.5
    wire = msgpack.unpackb(encode(protocol.FMT_MSGPACK, {"y": tensor}))["prediction"]["y"]
    assert wire["dtype"] == str(dtype).removeprefix("torch.")
    assert bytes(wire["data"]) == tensor.view(torch.int16).numpy().tobytes()


@pytest.mark.parametrize("dtype", HALVES)
def test_half_outputs_in_v2_json_and_binary(dtype: torch.dtype) -> None:
    tensor = torch.tensor(VALUES, dtype=dtype)
    datatype = "FP16" if dtype == torch.float16 else "BF16"
    context = v2codec.V2Context("m", "1", None, None, binary_default=False)
    body, fmt, _ = v2codec.encode_reply(context, tensor)
    (output,) = orjson.loads(body)["outputs"]
    assert fmt == protocol.FMT_V2_JSON and output["datatype"] == datatype
    assert torch.equal(torch.tensor(output["data"], dtype=dtype), tensor.reshape(-1))
    context = v2codec.V2Context("m", "1", None, None, binary_default=True)
    body, fmt, extra = v2codec.encode_reply(context, tensor)
    assert fmt == protocol.FMT_V2_BINARY
    assert body[extra["json_len"] :] == tensor.view(torch.int16).numpy().tobytes()


# --- deadlines count from arrival on the worker's own clock ----------------------


def test_timeout_ms_counts_from_arrival_on_the_monotonic_clock() -> None:
    arrived = time.monotonic()
    deadline = deadline_of({"timeout_ms": 20}, arrived)
    assert deadline is not None and deadline == pytest.approx(arrived + 0.02)
    while time.monotonic() <= deadline:  # a small timeout does expire
        time.sleep(0.005)
    assert time.monotonic() > deadline
    assert deadline_of({}, arrived) is None
    assert deadline_of({"timeout_ms": True}, arrived) is None


def test_a_remote_clock_offset_does_not_matter() -> None:
    # A sender whose wall clock runs an hour behind (or ahead) sends the same
    # timeout_ms; an absolute wall-clock field no longer counts.
    now = time.monotonic()
    for skew_s in (-3600.0, 3600.0):
        header = {"timeout_ms": 5000, "deadline_ms": (time.time() + skew_s) * 1000}
        deadline = deadline_of(header, now)
        assert deadline is not None and deadline - now == pytest.approx(5.0)
