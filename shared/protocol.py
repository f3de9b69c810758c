"""The torchpool wire protocol, version 3: gateway <-> worker over ZeroMQ.

The gateway binds one ROUTER socket. Every worker connects two DEALER sockets
to it, each with its own routing id, so requests and lifecycle never share a
queue on the worker's side:

    data channel     routing id  b"<uid>/d"   requests in, replies out
    control channel  routing id  b"<uid>/c"   hello, loading, ready, heartbeat, error, bye
                                              in: gateway heartbeats, stop

``<uid>`` names one worker process for its lifetime: the gateway hands a local
worker ``<model>/<slot>.<generation>`` (``<slot>.<generation>`` when the model
has no name), so uids stay unique across the pools of one gateway; a remote
worker makes one up (``<host>-<pid>-<random hex>`` unless given ``--uid``).

Every message is a multipart ZeroMQ message whose first frame is a msgpack map,
the header; its ``t`` key names the message type. Payload frames follow raw:

    REQUEST   gateway -> data     [ {t, v, id, fmt, timeout_ms, queued, ctype?, stream?, credit?,
                                     + v2 fields} | body ]
    REPLY     data -> gateway     [ {t, id, code, message?, details?, fmt?, json_len?} | body? ]
    CHUNK     data -> gateway     [ {t, id, seq} | body ]    one output of a stream
    END       data -> gateway     [ {t, id} ]                the stream is complete
    CANCEL    gateway -> data     [ {t, id} ]                stop this stream (client gone)
    CREDIT    gateway -> data     [ {t, id, n} ]             n more chunks may be sent
    HELLO     control -> gateway  [ {t, v, uid, slot, pid, host, device, cores, threads,
                                     model?, fingerprint?} ]  (a remote worker names its
                                     model and its settings' fingerprint)
    LOADING   control -> gateway  [ {t, uid} ]
    READY     control -> gateway  [ {t, uid, load_s, capacity, input_shape?, input_dtype?,
                                     signature?, + memory fields} ]
    HEARTBEAT control -> gateway  [ {t, uid, batch_s, batches, waits, threads?,
                                     thread_passes?, + memory fields} ]
    ERROR     control -> gateway  [ {t, uid, code, message, fatal} ]
    BYE       control -> gateway  [ {t, uid, reason} ]
    BEAT      gateway -> control  [ {t} ]       the gateway is alive
    STOP      gateway -> control  [ {t, reason} ] finish what you hold, then exit

``batches`` in a HEARTBEAT counts the forward passes the worker has run since
it started, by rows in the batch: ``[[rows, count], ...]`` (a list of pairs,
since map keys are strings only), cumulative, so a lost heartbeat loses
nothing. The gateway sums the increases into its batch-size histogram.

``timeout_ms`` in a REQUEST is the time the request has left when it is sent,
in milliseconds; the worker counts it from the moment the request arrives, so
no two clocks need to agree (a remote worker's may be off by seconds).

``queued`` in a REQUEST is how many requests wait in the gateway's queue for
want of credit as it is sent: a batch never waits for more while some do
(they reach a worker only once one answers; see :mod:`worker.serve.pacing`).
``waits`` in a HEARTBEAT is ``{"counts": [...], "sum": seconds}``: how long
requests waited in the worker before their forward pass, counted in the
buckets of ``WAIT_BUCKETS_S`` (one more count for the overflow), cumulative
like ``batches``.

``threads`` in a HEARTBEAT is the intra-op thread count of the worker's last
forward pass (more than its own cores when the pass borrowed idle workers'
cores, see ``worker.lending``); ``thread_passes`` counts its passes by thread
count, ``[[threads, count], ...]``, cumulative like ``batches``. Both are
optional: a worker of an older make leaves them out.

``batch_s`` in a HEARTBEAT is how long the forward pass now running has run,
in seconds, or null when the worker is idle: the gateway's way to tell a hung
forward from a busy one, since heartbeats flow from another thread.

``fmt`` says what a body frame holds: ``json`` (an HTTP JSON body, passed through
untouched so the gateway never parses tensors) or ``msgpack`` (the binary body
format below) or ``raw`` (any other HTTP body, passed untouched: an image,
audio, text, or a ``multipart/form-data`` upload; the REQUEST's ``ctype`` is
the HTTP Content-Type, parameters included, and the worker hands the bytes to
the handler's ``preprocess``). A REPLY with ``code == "ok"`` carries the encoded result; any
other code is an error code from :mod:`shared.errors` with a message.

Two more formats carry the Open Inference Protocol (KServe v2) ``/infer`` body,
again passed through untouched: ``v2json`` (the whole body is the JSON request)
and ``v2binary`` (the binary tensor extension: the first ``json_len`` bytes are
the JSON request, raw little-endian tensor bytes follow). Their REQUEST adds
``model`` and ``version`` (echoed in the answer), ``json_len`` for ``v2binary``,
and ``encoding`` (``gzip`` or ``deflate``) when the HTTP body was compressed.
Their REPLY is ``v2json`` (a JSON response) or ``v2binary`` with ``json_len``:
the JSON response, then the binary outputs' raw bytes.

Streams (a handler with ``predict_stream``). A REQUEST with ``stream: true``
is answered by CHUNKs, ``seq`` 0, 1, 2, ... in order, each body the UTF-8 JSON
object of one Server-Sent Event's ``data`` line (no newline in it), then one
END; or, at any point, an error REPLY, which ends the stream too. Flow
control is a credit per stream: the REQUEST's ``credit`` is how many CHUNKs
the worker may send before it must wait; each CREDIT adds ``n`` more, sent by
the gateway once it has written earlier chunks to the client. A worker out
of credit pauses the generator. CANCEL (the client left, or the gateway's
deadline passed) makes the worker close the generator and send nothing more
for that id; the gateway has forgotten it already. CANCEL and CREDIT for an
id the worker no longer runs are ignored. A REQUEST without ``stream`` to a
streaming model is answered by one REPLY holding every output in a list.
Format ``generate`` is the Open Inference Protocol's generate extension: the
body is its JSON request (``{"<input name>": value, "parameters": {...}}``),
the REQUEST carries ``model`` and ``version``, and each CHUNK is a generate
response object. Formats ``openai.embeddings``, ``openai.chat`` and
``openai.completions`` carry the OpenAI API's request bodies untouched
(:mod:`shared.openai_api` reads them); the REPLY, or each CHUNK of a stream,
is an OpenAI response object as JSON (``fmt`` ``json``).

READY's ``signature`` describes the model for ``/v2/models/{name}``:
``{"source": "demo" | "torchscript" | ..., "outputs": [{"name", "dtype",
"shape"}] | null, "stream": bool, "openai": [route, ...]}`` (the OpenAI routes its handler
declares); output shapes put ``-1`` for the batch and are known
only when the worker ran a warm-up forward.

Tensors are never pickled. A tensor travels as a map

    {"dtype": "float32", "shape": [2, 16], "data": <raw little-endian bytes>}

which is also the ``application/msgpack`` HTTP body format:
``{"input_tensor": <tensor map>}`` in, ``{"prediction": <tensor map or
list/map of them>}`` out. Decoding checks sizes before anything is allocated.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypedDict

import msgpack

from shared.errors import PayloadTooLarge, RequestError

# Carried by REQUEST and HELLO; a worker of another version is refused. Version 2
# replaced REQUEST's wall-clock ``deadline_ms`` with ``timeout_ms`` (time left);
# version 3 added streams (REQUEST ``stream``/``credit``, CHUNK, END, CANCEL, CREDIT).
#
# The version changes when one side would misread the other: a field whose meaning
# changes, a field or message a reader needs that an older peer does not send.
# Optional fields may be added, and fields nobody reads dropped, within a version:
# every reader ignores keys it does not know and defaults those it may lack. So
# version 3 stopped sending READY ``model_name``/``device`` and HEARTBEAT
# ``busy``/``served``, which no gateway ever read (the device comes from HELLO,
# requests served are counted by the gateway): remote workers of either make join
# either gateway.
VERSION: Final = 3

# Message types.
REQUEST: Final = "request"
REPLY: Final = "reply"
HELLO: Final = "hello"
LOADING: Final = "loading"
READY: Final = "ready"
HEARTBEAT: Final = "heartbeat"
ERROR: Final = "error"
BYE: Final = "bye"
BEAT: Final = "beat"
STOP: Final = "stop"
CHUNK: Final = "chunk"
END: Final = "end"
CANCEL: Final = "cancel"
CREDIT: Final = "credit"

# Worker -> gateway messages of a stream, on the data channel (besides REPLY).
STREAM_TYPES: Final = frozenset({CHUNK, END})

CONTROL_TYPES: Final = frozenset({HELLO, LOADING, READY, HEARTBEAT, ERROR, BYE})

# Body formats.
FMT_JSON: Final = "json"
FMT_MSGPACK: Final = "msgpack"
FMT_V2_JSON: Final = "v2json"
FMT_V2_BINARY: Final = "v2binary"
FMT_RAW: Final = "raw"
FMT_GENERATE: Final = "generate"
FMT_OPENAI_EMBEDDINGS: Final = "openai.embeddings"
FMT_OPENAI_CHAT: Final = "openai.chat"
FMT_OPENAI_COMPLETIONS: Final = "openai.completions"

# Reply code for success.
OK: Final = "ok"

# A stream's credit: chunks a worker may send ahead of what the client has been
# written; enough to keep a fast reader's pipe full, few enough that a slow one
# costs little. The gateway sends it in REQUEST ``credit``; a worker takes it
# for a REQUEST that names none.
STREAM_CREDIT: Final = 8

# A body frame at least this big is sent zero-copy (pyzmq tracks the buffer until
# it is sent); a smaller one is copied, which costs less than the tracking.
ZERO_COPY_BYTES: Final = 64 * 1024

# The model version of every served model (the Open Inference Protocol's, for
# instance in ``/v2/models/{name}/versions/1``): REQUEST ``version`` names it.
MODEL_VERSION: Final = "1"

# Routing-id suffixes of the two channels.
DATA_SUFFIX: Final = b"/d"
CONTROL_SUFFIX: Final = b"/c"

# The variables every threading runtime torch may pull in reads, once, at import:
# a local worker is spawned with them set to its core count, and sets them again.
THREAD_ENV_VARS: Final = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)

# Exit code of a worker whose model cannot be loaded (gunicorn's "app could not
# load" idea): the supervisor does not respawn such a worker in a hot loop.
EXIT_LOAD_FAILED: Final = 3
# Exit code of a worker that was given arguments it cannot use.
EXIT_BAD_CONFIG: Final = 2

# Upper bounds, in seconds, of the buckets of a HEARTBEAT's ``waits``.
WAIT_BUCKETS_S: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)

MAX_HEADER_BYTES: Final = 1 << 20
MAX_NDIM: Final = 16

# name -> bytes per element. The names are torch's dtype names without "torch.".
DTYPE_SIZES: Final[Mapping[str, int]] = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "uint16": 2,
    "int32": 4,
    "uint32": 4,
    "int64": 8,
    "uint64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
}


# A BYTES tensor's binary form (the v2 binary extension, gRPC's raw contents): each
# element a 4-byte little-endian length, then its bytes.
_BYTES_LENGTH: Final = struct.Struct("<I")


def join_bytes(items: Sequence[bytes]) -> bytes:
    """BYTES elements in their binary form."""
    return b"".join(_BYTES_LENGTH.pack(len(item)) + item for item in items)


def split_bytes(name: str, data: bytes | memoryview) -> list[bytes]:
    """The elements of a BYTES tensor's binary form; RequestError naming input ``name``
    when a length runs past the data."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise RequestError(f"input {name!r}: BYTES data ends inside a length prefix")
        (length,) = _BYTES_LENGTH.unpack_from(data, offset)
        offset += 4
        if offset + length > len(data):
            raise RequestError(f"input {name!r}: a BYTES element runs past the data")
        elements.append(bytes(data[offset : offset + length]))
        offset += length
    return elements


# Open Inference Protocol datatype -> dtype name (BYTES has no tensor dtype).
V2_DATATYPES: Final[Mapping[str, str]] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "BF16": "bfloat16",
    "FP32": "float32",
    "FP64": "float64",
}
V2_NAMES: Final[Mapping[str, str]] = {dtype: name for name, dtype in V2_DATATYPES.items()}


# --- the headers, one TypedDict per message type ---------------------------------
#
# What a header holds when it is built right. A header that came off a socket is
# only known to be a map with a ``t`` (unpack_header): its reader still checks
# each value it uses.


class MemoryFields(TypedDict, total=False):
    """Measured when the message is sent; the CUDA figures are None off CUDA."""

    rss_bytes: int
    # Proportional set size: shared pages count 1/N in each of the N processes
    # mapping them; private_bytes (USS) are this process's own, shared_pss_bytes
    # its share of the rest (pss = private + shared_pss). None where unknown.
    pss_bytes: int | None
    private_bytes: int | None
    shared_pss_bytes: int | None
    cuda_allocated_bytes: int | None
    cuda_reserved_bytes: int | None


class _Request(TypedDict):
    t: str
    v: int
    id: int
    fmt: str
    timeout_ms: int
    queued: int  # requests waiting in the gateway's queue for want of credit


class RequestExtras(TypedDict, total=False):
    """The REQUEST fields that only some body formats carry."""

    ctype: str  # fmt raw: the HTTP Content-Type, parameters included
    model: str  # v2 formats: echoed in the answer
    version: str
    json_len: int  # v2binary: bytes of JSON before the tensor bytes
    encoding: str  # v2 formats: gzip or deflate
    stream: bool  # answer with CHUNKs and END instead of one REPLY
    credit: int  # a stream's first credit: CHUNKs the worker may send unacknowledged


class RequestHeader(_Request, RequestExtras):
    pass


class _Reply(TypedDict):
    t: str
    id: int
    code: str


class ReplyHeader(_Reply, total=False):
    message: str
    details: dict[str, Any]
    fmt: str
    json_len: int


class _Hello(TypedDict):
    t: str
    v: int
    uid: str
    slot: int
    pid: int
    host: str
    device: str
    cores: list[int]
    threads: int


class HelloHeader(_Hello, total=False):
    # A remote worker's model (its --model-name) and shared.fingerprint of its
    # settings, which the gateway compares with its own for that model.
    model: str
    fingerprint: str
    # Why a remote worker sends no fingerprint (its model file is unreadable).
    fingerprint_error: str


class _Ready(MemoryFields):
    t: str
    uid: str
    load_s: float
    capacity: int


class ReadyHeader(_Ready, total=False):
    input_shape: list[int] | None
    input_dtype: str | None
    signature: dict[str, Any]


class HeartbeatThreads(TypedDict, total=False):
    threads: int  # intra-op threads of the last forward pass
    thread_passes: list[list[int]]  # [[threads, count], ...], cumulative


class HeartbeatHeader(MemoryFields, HeartbeatThreads):
    t: str
    uid: str
    batch_s: float | None  # seconds the batch now running has run; None when idle
    batches: list[list[int]]  # [[rows, count], ...], cumulative
    waits: dict[str, Any]  # {"counts": [...], "sum": seconds}, cumulative


class ErrorHeader(TypedDict):
    t: str
    uid: str
    code: str
    message: str
    fatal: bool


class ByeHeader(TypedDict):
    t: str
    uid: str
    reason: str


class BeatHeader(TypedDict):
    t: str


class StopHeader(TypedDict):
    t: str
    reason: str


def data_identity(uid: str) -> bytes:
    return uid.encode() + DATA_SUFFIX


def control_identity(uid: str) -> bytes:
    return uid.encode() + CONTROL_SUFFIX


def split_identity(identity: bytes) -> tuple[str, bytes]:
    """``b"0.1/d"`` -> ``("0.1", b"/d")``."""
    return identity[:-2].decode(errors="replace"), identity[-2:]


def pack(header: Mapping[str, Any]) -> bytes:
    """Encode a header (or a msgpack body) without any Python-object extension."""
    return msgpack.packb(header, use_bin_type=True)


def packer() -> Callable[[Mapping[str, Any]], bytes]:
    """:func:`pack` for one thread's use: it keeps one Packer and its buffer instead of
    making both per call (half the cost of a REQUEST header on the gateway's hot path)."""
    pack_one: Callable[[Mapping[str, Any]], bytes] = msgpack.Packer(use_bin_type=True).pack
    return pack_one


def unpack_header(frame: bytes | memoryview) -> dict[str, Any]:
    """Decode a header frame, refusing anything that is not a small map with a ``t``."""
    if len(frame) > MAX_HEADER_BYTES:
        raise ValueError(f"header of {len(frame)} bytes exceeds {MAX_HEADER_BYTES}")
    header = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    if not isinstance(header, dict) or not isinstance(header.get("t"), str):
        raise ValueError("header is not a map with a message type")
    return header


@dataclass(frozen=True, slots=True)
class TensorBytes:
    """A tensor as it travels: dtype name, shape, and its raw little-endian bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes | bytearray | memoryview

    def to_map(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "data": self.data}


def check_tensor(dtype: Any, shape: Any, nbytes: int, max_bytes: int) -> tuple[int, ...]:
    """Validate a tensor's description against its byte count; return the shape.

    Raises RequestError (400) for anything inconsistent and PayloadTooLarge
    (413) when the tensor would exceed ``max_bytes``, before allocating.
    """
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise RequestError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_SIZES)}")
    if not isinstance(shape, Sequence) or isinstance(shape, str | bytes):
        raise RequestError(f"shape must be a list of integers, got {shape!r}")
    if len(shape) > MAX_NDIM:
        raise RequestError(f"tensor has {len(shape)} dimensions; at most {MAX_NDIM} are allowed")
    dims: list[int] = []
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise RequestError(f"shape must hold non-negative integers, got {list(shape)!r}")
        dims.append(dim)
    expected = math.prod(dims) * DTYPE_SIZES[dtype]
    if expected > max_bytes:
        raise PayloadTooLarge(f"tensor of {expected} bytes exceeds the limit of {max_bytes}")
    if expected != nbytes:
        raise RequestError(
            f"tensor data holds {nbytes} bytes but dtype {dtype} and shape {dims} need {expected}"
        )
    return tuple(dims)


def tensor_from_map(obj: Any, max_bytes: int) -> TensorBytes:
    """Read a ``{"dtype", "shape", "data"}`` map, checking it before use."""
    if not isinstance(obj, Mapping):
        raise RequestError("a tensor must be a map with dtype, shape and data")
    missing = [key for key in ("dtype", "shape", "data") if key not in obj]
    if missing:
        raise RequestError(f"tensor map is missing {', '.join(missing)}")
    data = obj["data"]
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RequestError("tensor data must be raw bytes (msgpack bin)")
    shape = check_tensor(obj["dtype"], obj["shape"], len(data), max_bytes)
    return TensorBytes(obj["dtype"], shape, data)


def unpack_body(body: bytes | memoryview, max_bytes: int) -> Any:
    """Decode an ``application/msgpack`` body with limits on every container."""
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_bin_len=max_bytes,
            max_str_len=1 << 20,
            max_array_len=1 << 20,
            max_map_len=1 << 16,
            max_ext_len=0,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        # Some msgpack errors (FormatError, StackError) carry no message of their own.
        raise RequestError(f"body is not valid msgpack: {str(exc) or type(exc).__name__}") from exc
