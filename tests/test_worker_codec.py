"""Fast tier: request bodies to tensors and results to reply bodies, every error case."""

from __future__ import annotations

from typing import Any

import msgpack
import orjson
import pytest
import torch

from shared import protocol
from shared.errors import ModelFailure, PayloadTooLarge, RequestError, ShapeMismatch
from worker import codec

LIMIT = 1 << 20


def decode_json(
    body: bytes, shape: tuple[int, ...] | None = (2,), dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    return codec.decode_request(
        protocol.FMT_JSON, body, dtype=dtype, input_shape=shape, max_bytes=LIMIT
    )


def decode_msgpack(value: Any, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    body = protocol.pack({"input_tensor": value})
    return codec.decode_request(
        protocol.FMT_MSGPACK, body, dtype=torch.float32, input_shape=shape, max_bytes=LIMIT
    )


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
        codec.decode_request(
            protocol.FMT_JSON, b'{"input_tensor": [[1]]}', dtype=torch.float32,
            input_shape=None, max_bytes=4,
        )  # fmt: skip


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
        codec.decode_request(
            protocol.FMT_MSGPACK, b"\xc1", dtype=torch.float32, input_shape=None, max_bytes=LIMIT
        )
    with pytest.raises(PayloadTooLarge):
        big = codec.tensor_to_wire(torch.zeros(64, 64))
        codec.decode_request(
            protocol.FMT_MSGPACK, protocol.pack({"input_tensor": big}), dtype=torch.float32,
            input_shape=None, max_bytes=1000,
        )  # fmt: skip


def test_preprocess_errors_are_400() -> None:
    def preprocess(payload: Any) -> torch.Tensor:
        raise KeyError("image")

    with pytest.raises(RequestError, match="preprocess rejected the input: KeyError"):
        codec.decode_request(
            protocol.FMT_JSON, b'{"input_tensor": {"x": 1}}', dtype=torch.float32,
            input_shape=None, max_bytes=LIMIT, preprocess=preprocess,
        )  # fmt: skip


def test_encode_json_structures() -> None:
    result = {
        "logits": torch.tensor([[1.5, 2.0]], dtype=torch.bfloat16),
        "pair": (torch.tensor([1, 2]), torch.tensor(3.0)),
        "label": "cat",
    }
    body = orjson.loads(codec.encode_reply(protocol.FMT_JSON, result))
    assert body == {"prediction": {"logits": [[1.5, 2.0]], "pair": [[1, 2], 3.0], "label": "cat"}}
    transposed = torch.arange(6.0).reshape(2, 3).T
    body = orjson.loads(codec.encode_reply(protocol.FMT_JSON, transposed))
    assert body["prediction"] == transposed.tolist()


def test_encode_msgpack_tensor_maps() -> None:
    out = {"y": torch.tensor([[1.0, 2.0]], dtype=torch.float16), "n": 3}
    body = msgpack.unpackb(codec.encode_reply(protocol.FMT_MSGPACK, out))
    wire = body["prediction"]["y"]
    assert wire["dtype"] == "float16" and wire["shape"] == [1, 2]
    assert codec.tensor_from_wire(wire, LIMIT).tolist() == [[1.0, 2.0]]
    assert body["prediction"]["n"] == 3


def test_unencodable_output_is_a_model_failure() -> None:
    with pytest.raises(ModelFailure):
        codec.encode_reply(protocol.FMT_JSON, object())
