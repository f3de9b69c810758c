"""One copy of a model's weights per host: the first worker publishes, the others map.

A published file holds every parameter and buffer of a model's modules, and,
for TorchScript, the archive without its weights (its *skeleton*)::

    b"TPWEIGHT" | u64 index length | msgpack index | pad | tensor bytes, each page-aligned

    index = {"tensors": [{"name", "dtype", "shape", "offset", "nbytes"}, ...],
             "skeleton": {"offset", "nbytes"} | None}

Offsets count from the start of the file. A worker maps the file once with
``MAP_PRIVATE`` and points each tensor of its model at a view of that mapping:
the pages come from the one copy in ``/dev/shm`` (or the ``--weights-cache``
folder), shared by every worker; a model that writes to a weight gets a private
copy of that page only, so it never changes another worker's weights.

Publishing is atomic: the file is written under a temporary name, fsynced and
renamed, so a reader never maps half a file. Workers that boot together take
turns on an ``flock`` of ``<key>.lock``: the first loads and publishes, the
others wait and map. A lock dies with its holder, even by SIGKILL.

The gateway owns the folder (``--weights-dir``) and removes it; a worker only
ever adds files to it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgpack
import torch

from shared.config import ModelSettings
from shared.fingerprint import ANSWER_FIELDS
from worker.codec.tensors import dtype_name

MAGIC: Final = b"TPWEIGHT"
_HEADER: Final = struct.Struct("<8sQ")
PAGE: Final = mmap.PAGESIZE
SUFFIX: Final = ".weights"
# msgpack limits for the index: it names every tensor once, nothing more.
_MAX_INDEX_BYTES: Final = 64 << 20


@dataclass
class Mapped:
    """A published file, mapped copy-on-write: tensor views by name, and the skeleton."""

    path: Path
    tensors: dict[str, torch.Tensor]
    skeleton: bytes | None
    nbytes: int
    # Kept so the mapping outlives every view (the views also hold it).
    mapping: mmap.mmap


@dataclass
class Sharing:
    """How this worker holds its weights, for /health and the log."""

    shared: bool
    reason: str
    file: str | None = None
    bytes: int = 0
    # Whether this worker mapped what another published (True) or published it.
    mapped: bool = False
    # Seconds the model itself took to load (torch was imported already), publishing
    # or mapping included: what sharing can shorten, apart from the interpreter's start.
    load_s: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "shared": self.shared,
            "reason": self.reason,
            "file": self.file,
            "bytes": self.bytes,
            "mapped": self.mapped,
            "load_s": self.load_s,
        }


def content_key(settings: ModelSettings, kind: str) -> str:
    """What makes published weights reusable: the answer-changing settings and the file.

    The file is named by path, size, inode and mtime (hashing its bytes would
    cost as much as loading it); a rewritten file gets a new key.
    """
    parts: dict[str, Any] = {name: getattr(settings, name) for name in ANSWER_FIELDS}
    parts["kind"] = kind
    parts["torch"] = torch.__version__
    if settings.model:
        path = Path(settings.model).resolve()
        stat = path.stat()
        parts["file"] = [str(path), stat.st_size, stat.st_ino, stat.st_mtime_ns]
    text = json.dumps(parts, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class Store:
    """The published weights of one model under one key, in a folder the gateway owns."""

    def __init__(self, directory: Path, key: str) -> None:
        self.directory = directory
        self.path = directory / f"{key}{SUFFIX}"
        self._lock_path = directory / f"{key}.lock"

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """Hold the key's lock: one worker loads and publishes while the others wait."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def open(self) -> Mapped | None:
        """Map the published file, or None when nobody has published it yet."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            # MAP_PRIVATE with write access: reads share the file's pages, a
            # write copies the one page it touches into this process alone.
            mapping = mmap.mmap(
                fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        finally:
            os.close(fd)
        magic, length = _HEADER.unpack_from(mapping, 0)
        if magic != MAGIC or length > _MAX_INDEX_BYTES:
            raise ValueError(f"{self.path} is not a torchpool weights file")
        index = msgpack.unpackb(mapping[_HEADER.size : _HEADER.size + length], raw=False)
        tensors: dict[str, torch.Tensor] = {}
        for entry in index["tensors"]:
            dtype = getattr(torch, entry["dtype"])
            count = entry["nbytes"] // _itemsize(dtype)
            flat = (
                torch.frombuffer(mapping, dtype=dtype, count=count, offset=entry["offset"])
                if count
                else torch.empty(0, dtype=dtype)
            )
            tensors[entry["name"]] = flat.view(entry["shape"])
        skeleton = None
        if index.get("skeleton"):
            at, nbytes = index["skeleton"]["offset"], index["skeleton"]["nbytes"]
            skeleton = bytes(mapping[at : at + nbytes])
        return Mapped(self.path, tensors, skeleton, size, mapping)

    def publish(self, tensors: dict[str, torch.Tensor], skeleton: bytes | None = None) -> None:
        """Write ``tensors`` (and ``skeleton``) atomically; call within :meth:`turn`."""
        entries: list[dict[str, Any]] = []
        offset = 0  # relative to the data start, fixed once the index size is known
        for name, tensor in tensors.items():
            nbytes = tensor.numel() * tensor.element_size()
            entries.append(
                {
                    "name": name,
                    "dtype": dtype_name(tensor.dtype),
                    "shape": list(tensor.shape),
                    "offset": offset,
                    "nbytes": nbytes,
                }
            )
            offset = _aligned(offset + nbytes)
        skeleton_at = offset
        # Offsets are absolute, so the index's own size moves the data: pack it
        # once with placeholders that have the final width (u64) to measure it.
        index: dict[str, Any] = {"tensors": entries, "skeleton": None}
        if skeleton is not None:
            index["skeleton"] = {"offset": skeleton_at, "nbytes": len(skeleton)}
        start = _aligned(_HEADER.size + len(_pack(index, shift=1 << 40)))
        packed = _pack(index, shift=start)
        temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
        try:
            with temporary.open("wb") as file:
                file.write(_HEADER.pack(MAGIC, len(packed)))
                file.write(packed)
                for entry, tensor in zip(entries, tensors.values(), strict=True):
                    file.seek(start + entry["offset"])
                    file.write(_bytes_of(tensor))
                if skeleton is not None:
                    file.seek(start + skeleton_at)
                    file.write(skeleton)
                file.flush()
                os.fsync(file.fileno())
            os.rename(temporary, self.path)
        except BaseException:
            # A full /dev/shm, say: leave no half file to fill it further.
            temporary.unlink(missing_ok=True)
            raise


def _pack(index: dict[str, Any], shift: int) -> bytes:
    shifted: dict[str, Any] = {
        "tensors": [{**e, "offset": e["offset"] + shift} for e in index["tensors"]],
        "skeleton": None,
    }
    if index["skeleton"] is not None:
        skeleton = index["skeleton"]
        shifted["skeleton"] = {**skeleton, "offset": skeleton["offset"] + shift}
    return bytes(msgpack.packb(shifted, use_bin_type=True))


def _aligned(offset: int) -> int:
    return -(-offset // PAGE) * PAGE


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    array: Any = flat.view(torch.uint8).numpy()
    return memoryview(array)
