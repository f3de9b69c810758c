"""Regenerate the gRPC code in gateway/api/grpc/generated/ from the .proto beside it.

    .venv/bin/python scripts/gen_grpc.py          write the files
    .venv/bin/python scripts/gen_grpc.py --check  exit 1 when they differ from the .proto

grpcio-tools' protoc writes the messages (``_pb2.py``) and the service
(``_pb2_grpc.py``); mypy-protobuf's plugins write their stubs (``.pyi``), so
mypy checks the code that uses them. protoc imports a sibling module as a
top-level one (``import grpc_predict_v2_pb2``); that one line becomes a
package-relative import, the only edit made. tests/test_grpc_generated.py
runs ``--check``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "gateway" / "api" / "grpc" / "proto" / "grpc_predict_v2.proto"
OUT = ROOT / "gateway" / "api" / "grpc" / "generated"
STEM = PROTO.stem
OUTPUTS = (f"{STEM}_pb2.py", f"{STEM}_pb2.pyi", f"{STEM}_pb2_grpc.py", f"{STEM}_pb2_grpc.pyi")


def generate(folder: Path) -> None:
    """Write every generated file of the .proto into ``folder``."""
    from grpc_tools import protoc

    proto_include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO.parent}",
        f"-I{proto_include}",
        f"--python_out={folder}",
        f"--grpc_python_out={folder}",
        f"--mypy_out={folder}",
        f"--mypy_grpc_out={folder}",
        str(PROTO),
    ]
    # protoc finds the mypy plugins on PATH, beside this interpreter.
    bin_dir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO}")
    for name in (f"{STEM}_pb2_grpc.py", f"{STEM}_pb2_grpc.pyi"):
        path = folder / name
        text = path.read_text()
        text = text.replace(f"import {STEM}_pb2 as ", f"from . import {STEM}_pb2 as ")
        text = text.replace(f"\nimport {STEM}_pb2\n", f"\nfrom . import {STEM}_pb2\n")
        path.write_text(text)


def differences() -> list[str]:
    """The generated files that are missing or differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        return [
            name
            for name in OUTPUTS
            if not (OUT / name).is_file()
            or (OUT / name).read_bytes() != (fresh / name).read_bytes()
        ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    if parser.parse_args().check:
        stale = differences()
        if stale:
            print(f"stale: {', '.join(stale)}; run scripts/gen_grpc.py", file=sys.stderr)
            return 1
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        for name in OUTPUTS:
            shutil.copyfile(Path(tmp) / name, OUT / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
