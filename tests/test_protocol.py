"""The wire protocol: headers, tensor maps and the application/msgpack body."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest

from shared import protocol
from shared.errors import PayloadTooLarge, RequestError

pytestmark = pytest.mark.fast

LIMIT = 1 << 20


def test_header_round_trip() -> None:
    header = {
        "t": protocol.REQUEST,
        "v": protocol.VERSION,
        "id": 7,
        "fmt": protocol.FMT_MSGPACK,
        "timeout_ms": 30_000,
        "nested": {"cores": [0, 1], "ok": True, "none": None, "ratio": 0.5},
    }
    frame = protocol.pack(header)
    assert isinstance(frame, bytes)
    assert protocol.unpack_header(frame) == header
    assert protocol.unpack_header(memoryview(frame)) == header


def test_pack_keeps_bytes_and_strings_apart() -> None:
    decoded = protocol.unpack_header(protocol.pack({"t": "x", "b": b"\x00\xff", "s": "é"}))
    assert decoded["b"] == b"\x00\xff"
    assert decoded["s"] == "é"


def test_pack_refuses_python_objects() -> None:
    with pytest.raises(TypeError):
        protocol.pack({"t": "x", "obj": object()})


def test_a_reused_packer_encodes_as_pack_does_even_after_a_refusal() -> None:
    pack = protocol.packer()
    headers: list[dict[str, Any]] = [
        {"t": protocol.REQUEST, "v": protocol.VERSION, "id": 7, "fmt": "json", "timeout_ms": 5},
        {"t": "x", "b": b"\x00\xff", "s": "é", "n": None, "f": 0.5},
        {"t": "x"},
    ]
    for header in headers:
        assert pack(header) == protocol.pack(header)
    with pytest.raises(TypeError):
        pack({"t": "x", "obj": object()})
    assert [pack(h) for h in headers] == [protocol.pack(h) for h in headers]


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xc1",  # a byte msgpack never uses
        b"\x81\xa1t",  # truncated
        msgpack.packb([1, 2]),
        msgpack.packb({"id": 1}),  # no type
        msgpack.packb({"t": 3}),  # type is not a string
        msgpack.packb({1: "x", "t": "x"}),  # non-string key
        msgpack.packb({"t": "x"}) + b"\x00",  # trailing bytes
    ],
)
def test_malformed_header_is_rejected(frame: bytes) -> None:
    with pytest.raises(ValueError):
        protocol.unpack_header(frame)


def test_oversized_header_is_rejected_before_decoding() -> None:
    frame = protocol.pack({"t": "x", "pad": b"\x00" * protocol.MAX_HEADER_BYTES})
    with pytest.raises(ValueError, match="exceeds"):
        protocol.unpack_header(frame)


def test_message_types_are_distinct() -> None:
    types = [
        protocol.REQUEST, protocol.REPLY, protocol.HELLO, protocol.LOADING, protocol.READY,
        protocol.HEARTBEAT, protocol.ERROR, protocol.BYE, protocol.BEAT, protocol.STOP,
    ]  # fmt: skip
    assert len(set(types)) == len(types)
    lifecycle = {
        protocol.HELLO, protocol.LOADING, protocol.READY,
        protocol.HEARTBEAT, protocol.ERROR, protocol.BYE,
    }  # fmt: skip
    assert lifecycle == protocol.CONTROL_TYPES
    assert protocol.EXIT_LOAD_FAILED not in (0, 1, protocol.EXIT_BAD_CONFIG)


def test_identities_split_and_join() -> None:
    assert protocol.data_identity("0.1") == b"0.1/d"
    assert protocol.control_identity("12.3") == b"12.3/c"
    assert protocol.split_identity(b"0.1/d") == ("0.1", protocol.DATA_SUFFIX)
    assert protocol.split_identity(protocol.control_identity("remote-ab")) == (
        "remote-ab",
        protocol.CONTROL_SUFFIX,
    )
    uid, suffix = protocol.split_identity(b"\xff\xfe/d")
    assert suffix == protocol.DATA_SUFFIX
    assert isinstance(uid, str)  # undecodable ids do not raise


# --- tensors ------------------------------------------------------------------

SHAPES = [(), (1,), (3,), (2, 16), (0,), (4, 0, 3), (1, 1, 1, 1), (2, 3, 1, 5)]


@pytest.mark.parametrize("dtype", sorted(protocol.DTYPE_SIZES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tensor_map_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    nbytes = math.prod(shape) * protocol.DTYPE_SIZES[dtype]
    data = bytes(range(256)) * (nbytes // 256) + bytes(range(nbytes % 256))
    tensor = protocol.TensorBytes(dtype, shape, data)
    assert protocol.check_tensor(dtype, list(shape), nbytes, LIMIT) == shape
    body = protocol.pack({"input_tensor": tensor.to_map()})
    decoded = protocol.unpack_body(body, LIMIT)
    again = protocol.tensor_from_map(decoded["input_tensor"], LIMIT)
    assert again == tensor


def test_dtype_sizes_are_torch_names() -> None:
    assert protocol.DTYPE_SIZES["float32"] == 4
    assert protocol.DTYPE_SIZES["bfloat16"] == 2
    assert protocol.DTYPE_SIZES["bool"] == 1
    assert all(not name.startswith("torch.") for name in protocol.DTYPE_SIZES)


def test_size_mismatch_is_a_request_error() -> None:
    with pytest.raises(RequestError, match="holds 63 bytes") as info:
        protocol.check_tensor("float32", [4, 4], 63, LIMIT)
    assert type(info.value) is RequestError
    with pytest.raises(RequestError):
        protocol.tensor_from_map({"dtype": "int64", "shape": [2], "data": b"\x00" * 8}, LIMIT)


def test_over_limit_is_refused_before_allocation() -> None:
    # A claimed size far beyond memory: refused from the header alone.
    with pytest.raises(PayloadTooLarge, match="exceeds"):
        protocol.check_tensor("float64", [1 << 40, 1 << 40], 0, LIMIT)
    with pytest.raises(PayloadTooLarge):
        protocol.tensor_from_map({"dtype": "uint8", "shape": [LIMIT + 1], "data": b""}, LIMIT)
    # Exactly at the limit is fine.
    assert protocol.check_tensor("uint8", [LIMIT], LIMIT, LIMIT) == (LIMIT,)


@pytest.mark.parametrize("dtype", ["float128", "torch.float32", "complex64", "", 4, None, b"f4"])
def test_unknown_dtype(dtype: Any) -> None:
    with pytest.raises(RequestError, match="unknown dtype"):
        protocol.check_tensor(dtype, [1], 4, LIMIT)


def test_too_many_dims() -> None:
    shape = [1] * (protocol.MAX_NDIM + 1)
    with pytest.raises(RequestError, match="dimensions"):
        protocol.check_tensor("uint8", shape, 1, LIMIT)
    assert protocol.check_tensor("uint8", [1] * protocol.MAX_NDIM, 1, LIMIT)


@pytest.mark.parametrize("shape", ["2,2", b"\x02", 4, None, [2, -1], [2.0, 2], [True, 1], [[2]]])
def test_bad_shape(shape: Any) -> None:
    with pytest.raises(RequestError, match="shape"):
        protocol.check_tensor("uint8", shape, 4, LIMIT)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([1, 2], "must be a map"),
        ({"dtype": "uint8", "shape": [1]}, "missing data"),
        ({"data": b"x"}, "missing dtype, shape"),
        ({"dtype": "uint8", "shape": [1], "data": "x"}, "raw bytes"),
        ({"dtype": "uint8", "shape": [1], "data": [1]}, "raw bytes"),
    ],
)
def test_tensor_from_map_rejects(obj: Any, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        protocol.tensor_from_map(obj, LIMIT)


def test_tensor_from_map_accepts_memoryview() -> None:
    data = memoryview(b"\x00" * 8)
    tensor = protocol.tensor_from_map({"dtype": "float32", "shape": (2,), "data": data}, LIMIT)
    assert tensor.shape == (2,)
    assert tensor.data is data


# --- application/msgpack bodies -------------------------------------------------


def test_unpack_body_round_trip() -> None:
    document = {"input_tensor": [[0.5, 1.0], [2.0, 3.0]], "name": "x"}
    assert protocol.unpack_body(protocol.pack(document), LIMIT) == document


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",
        b"\x81\xa1t",
        msgpack.packb(msgpack.ExtType(5, b"ab")),
        msgpack.packb({"input_tensor": msgpack.ExtType(1, b"\x80\x04")}),  # pickle-like ext
        msgpack.packb({1: "int key"}),
        msgpack.packb(1) + b"trailing",
        b"\x91" * 5000,  # nesting deeper than the unpacker allows
        b'{"input_tensor": [[1.0]]}',  # JSON is not msgpack
    ],
)
def test_unpack_body_rejects(body: bytes) -> None:
    with pytest.raises(RequestError, match=r"not valid msgpack: \S"):
        protocol.unpack_body(body, LIMIT)


def test_unpack_body_limits_binary_size() -> None:
    body = protocol.pack({"input_tensor": {"dtype": "uint8", "shape": [64], "data": b"\x00" * 64}})
    assert protocol.unpack_body(body, 64)["input_tensor"]["shape"] == [64]
    with pytest.raises(RequestError):
        protocol.unpack_body(body, 63)
