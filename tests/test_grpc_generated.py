"""The generated gRPC code in gateway/api/grpc/generated/ is what its .proto makes."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_generated_code_matches_the_proto() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_grpc.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
