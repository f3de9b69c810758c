"""What a model file is, told from its structure alone: no torch, nothing unpickled.

The gateway checks ``--model`` with this before it spawns a worker, and the
worker with the same code before it hands the file to torch, so both say the
same one line. The kinds torchpool reads:

    TORCHSCRIPT  a zip with ``*/code/`` or ``*/constants.pkl``     torch.jit.save
    EXPORT       a zip with ``*/archive_format`` (a .pt2 archive)    torch.export.save
    TENSORS      a torch.save file whose pickle names only tensor    torch.save(state_dict)
                 rebuilders, storages, dtypes and plain containers
    PICKLE       a torch.save file whose pickle names anything else  torch.save(model)
                 (a class, a function): loading it runs that code

torch.save files come as a zip holding ``*/data.pkl`` or, from the legacy
writer, as a run of pickles (magic number, protocol, system info, the object).
Pickles are read with :func:`pickletools.genops`, which only decodes opcodes;
the GLOBAL and STACK_GLOBAL names they carry tell the kind. This is a label
for messages and early refusals, not a safety check: torch's ``weights_only``
loader stays the guard for TENSORS files.

Anything else gets a :class:`~shared.errors.ModelLoadError` that says what the
file is not (and what it is, where that is easy to tell: empty, text, a
truncated zip, a bare pickle, safetensors).
"""

from __future__ import annotations

import pickletools
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from shared.errors import ModelLoadError

TORCHSCRIPT: Final = "TorchScript archive"
EXPORT: Final = "torch.export program"
TENSORS: Final = "torch.save file of tensors"
PICKLE: Final = "pickled Python object"

READS: Final = (
    "torchpool reads a TorchScript archive, a torch.export program (.pt2), "
    "a torch.save state_dict (with --model-class) or a pickled nn.Module (with --trust-pickle)"
)

# torch.save's legacy (non-zip) format opens with this number, pickled.
_LEGACY_MAGIC: Final = 0x1950A86A20F9469CFC6C
# How many of a pickle's code references a message names.
_SHOWN: Final = 3

# The globals a torch.save of tensors and plain data references: the names
# torch's weights_only unpickler allows, as patterns over "module.name".
_TENSOR_GLOBALS: Final = re.compile(
    r"""(
        collections\.(OrderedDict|Counter)
      | (builtins|__builtin__)\.(set|frozenset|bytearray|complex|slice)
      | _codecs\.encode
      | torch\.(cuda\.|sparse\.|cuda\.sparse\.)?\w+(Storage|Tensor)
      | torch\.(Size|device|Tensor)
      | torch\.(b?float\w*|half|double|long|short|bool|u?int\w*|complex\w*|c(half|float|double)
                |bits\w+|q?u?int\w+|per_(tensor|channel)_\w+)
      | torch\._utils\._rebuild_\w+
      | torch\._tensor\._rebuild_from_type_v2
      | torch\.nn\.parameter\.Parameter
      | torch\.serialization\._get_layout
      | torch\.storage\.(Typed|Untyped)Storage
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class ModelFile:
    """A recognised model file: its ``kind`` and, for a PICKLE, the code it names."""

    path: Path
    kind: str
    # The first few non-tensor globals of a pickle, e.g. ("mypkg.nets.MLP",).
    code: tuple[str, ...] = ()
    legacy: bool = False

    def names(self) -> str:
        """The pickle's code references for a message: ``a.B, c.D (+2 more)``."""
        shown = ", ".join(self.code[:_SHOWN])
        more = len(self.code) - _SHOWN
        return f"{shown} (+{more} more)" if more > 0 else shown


def check(path: str | Path, *, model_class: bool, trust_pickle: bool) -> ModelFile:
    """:func:`sniff`, then refuse what these flags cannot load, in one line.

    Everything refused here the worker would refuse too, only later: a
    TorchScript or torch.export archive with ``--model-class``, pickled
    objects given as a state_dict or without ``--trust-pickle``, tensors
    without ``--model-class``.
    """
    found = sniff(path)
    where = found.path
    if found.kind in (TORCHSCRIPT, EXPORT):
        if model_class:
            raise ModelLoadError(
                f"{where} is a {found.kind}, which holds its own code: drop --model-class"
            )
    elif model_class:
        if found.kind == PICKLE:
            raise ModelLoadError(
                f"{where} is not a plain state_dict: it holds pickled objects "
                f"({found.names()}); save model.state_dict() instead"
            )
    elif found.kind == TENSORS:
        raise ModelLoadError(
            f"{where} holds tensors only (a state_dict or checkpoint), not a model: pass "
            "--model-class package.module:Class to build the model it belongs to"
        )
    elif not trust_pickle:
        raise ModelLoadError(
            f"{where} is a pickled Python object ({found.names()}); unpickling runs "
            "arbitrary code: pass --trust-pickle if you trust the file, or save the model "
            "as TorchScript / torch.export, or its state_dict for --model-class"
        )
    return found


def sniff(path: str | Path) -> ModelFile:
    """Which kind of model file ``path`` is; a ModelLoadError saying why it is none."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file {str(path)!r} does not exist")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a folder, not a model file; {READS}")
    if not path.is_file():
        raise ModelLoadError(f"{path} is not a regular file; {READS}")
    try:
        with path.open("rb") as stream:
            head = stream.read(64)
            if zipfile.is_zipfile(stream):
                return _sniff_zip(path, stream)
            stream.seek(0)
            if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO 2-5
                return _sniff_legacy(path, stream)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from exc
    raise ModelLoadError(f"{path} is {_describe(head)}, not a model file; {READS}")


def _sniff_zip(path: Path, stream: IO[bytes]) -> ModelFile:
    try:
        with zipfile.ZipFile(stream) as archive:
            # Every member sits under one top folder, named after the archive.
            members = {name.partition("/")[2]: name for name in archive.namelist()}
            if (
                "archive_format" in members
                or "models/model.json" in members
                or any("serialized_exported_program" in name for name in members)
            ):
                return ModelFile(path, EXPORT)
            if "constants.pkl" in members or any(name.startswith("code/") for name in members):
                return ModelFile(path, TORCHSCRIPT)
            if "data.pkl" not in members:
                raise ModelLoadError(
                    f"{path} is a zip archive that torch did not write (no data.pkl, code/ "
                    f"or archive_format in it); {READS}"
                )
            with archive.open(members["data.pkl"]) as data:
                return _classify(path, _globals(data), legacy=False)
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        raise ModelLoadError(f"{path} is a damaged zip archive ({exc}); {READS}") from exc


def _sniff_legacy(path: Path, stream: IO[bytes]) -> ModelFile:
    """torch.save's legacy format: magic number, protocol, system info, then the object."""
    try:
        magic = _first_int(stream)
        if magic != _LEGACY_MAGIC:
            raise ModelLoadError(
                f"{path} is a Python pickle, not a torch.save file (no torch magic number); {READS}"
            )
        for _ in range(2):  # the protocol version and the system info
            _globals(stream)
        return _classify(path, _globals(stream), legacy=True)
    except ValueError as exc:
        raise ModelLoadError(f"{path} is a damaged pickle ({exc}); {READS}") from exc


def _classify(path: Path, names: list[str], *, legacy: bool) -> ModelFile:
    code = tuple(dict.fromkeys(name for name in names if not _TENSOR_GLOBALS.fullmatch(name)))
    return ModelFile(path, PICKLE if code else TENSORS, code, legacy)


def _first_int(stream: IO[bytes]) -> int | None:
    """The value of a pickle that holds one integer; None for any other pickle."""
    value: int | None = None
    for opcode, arg, _ in pickletools.genops(stream):
        if opcode.name in ("LONG1", "LONG4", "BININT", "BININT1", "BININT2") and isinstance(
            arg, int
        ):
            value = arg
        elif opcode.name not in ("PROTO", "STOP", "FRAME"):
            value = None
    return value


def _globals(stream: IO[bytes]) -> list[str]:
    """The ``module.name`` of every global one pickle references, up to its STOP.

    GLOBAL carries its name as an argument; STACK_GLOBAL (protocol 4+) takes
    the two strings pushed before it, directly or through the memo.
    """
    names: list[str] = []
    memo: dict[int, str | None] = {}
    strings: list[str | None] = []  # the values pushed lately, strings or None
    # genops stops at STOP and leaves the stream there: the legacy format's
    # next pickle starts where this one ends.
    for opcode, arg, _ in pickletools.genops(stream):
        name = opcode.name
        if name == "GLOBAL" and isinstance(arg, str):
            names.append(".".join(arg.split(" ", 1)))
            strings.append(None)
        elif name == "STACK_GLOBAL":
            module, attr = strings[-2:] if len(strings) == 2 else (None, None)
            names.append(f"{module}.{attr}" if module and attr else "<a computed global>")
            strings.append(None)
        elif name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            strings.append(arg if isinstance(arg, str) else None)
        elif name in ("BINPUT", "LONG_BINPUT", "PUT") and isinstance(arg, int):
            memo[arg] = strings[-1] if strings else None
        elif name == "MEMOIZE":
            memo[len(memo)] = strings[-1] if strings else None
        elif name in ("BINGET", "LONG_BINGET", "GET") and isinstance(arg, int):
            strings.append(memo.get(arg))
        elif name not in ("FRAME", "PROTO"):
            strings.append(None)
        del strings[:-2]
    return names


def _describe(head: bytes) -> str:
    """What a file that is no model file looks like, from its first bytes."""
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        return "a truncated or damaged zip archive (no central directory)"
    if len(head) >= 9 and head[8:9] == b"{":
        (length,) = struct.unpack("<Q", head[:8])
        if 0 < length < 1 << 30:
            return "a safetensors file (load it from a --handler)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data of an unknown kind"
    if all(char.isprintable() or char.isspace() for char in text):
        return "a text file"
    return "binary data of an unknown kind"
