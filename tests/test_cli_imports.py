"""The commands that serve no HTTP do not load the HTTP stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

# Runs in a fresh interpreter: the test process has FastAPI loaded already.
PROGRAM = """
import sys
from gateway.cli import main

assert main(["keys", "server", "--dir", sys.argv[1]]) == 0
heavy = sorted(m for m in ("fastapi", "starlette", "uvicorn", "torch") if m in sys.modules)
print("HEAVY", heavy)
"""


def test_keys_command_loads_no_fastapi(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout
    assert (tmp_path / "server.key").is_file() and (tmp_path / "server.key_secret").is_file()


@pytest.mark.fast
def test_create_app_is_still_importable_from_the_package() -> None:
    import gateway
    from gateway.api.app import create_app

    assert gateway.create_app is create_app
