"""Every command and request in README.md and docs/*.md is run, as it is written.

Fast tier (no processes): each curl line is tagged with the server it needs
and points at http://127.0.0.1:8000, and tables copied from bench/ match it.

Real tier: one real `torchpool serve` per distinct ``serve ARGS`` comment
(see tests/docblocks.py), on a free port, with 127.0.0.1:8000 rewritten to
it; each curl line of its blocks runs verbatim through bash and must answer
2xx (or the status its comment declares), and each output block must equal
the answer of the curl line above it. The ``run`` blocks and ``file`` blocks
are run and written first, in one folder that is every server's and every
command's working directory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, free_port, wait_for
from tests.docblocks import TAG, Block, pages, parse_all, unfenced_curl_lines

BOOT_TIMEOUT_S = 240.0
CURL = shutil.which("curl")
ALL, PROBLEMS = parse_all()


def _served() -> dict[tuple[str, ...], list[Block]]:
    groups: dict[tuple[str, ...], list[Block]] = {}
    for block in ALL:
        if block.tag and block.tag.serve is not None:
            groups.setdefault(block.tag.serve, []).append(block)
    return groups


GROUPS = _served()


# --- fast: the rules ------------------------------------------------------------------


@pytest.mark.fast
def test_docs_test_comments_are_well_formed() -> None:
    assert not PROBLEMS, "\n".join(PROBLEMS)


@pytest.mark.fast
def test_every_curl_line_names_its_server() -> None:
    untagged = [
        f"{block.where}: {line[:60]}"
        for block in ALL
        for line in block.curl_lines()
        if not (block.tag and (block.tag.serve is not None or block.tag.skip))
    ]
    assert not untagged, (
        "curl lines with no server to run against: put <!-- docs-test: serve ARGS --> "
        "(the torchpool serve arguments) right before the block, or "
        "<!-- docs-test: skip REASON --> if it cannot run in a test:\n" + "\n".join(untagged)
    )


@pytest.mark.fast
def test_curl_lines_are_fenced() -> None:
    found = [where for page in pages() for where in unfenced_curl_lines(page)]
    assert not found, f"curl lines in indented blocks; use a fenced ```bash block: {found}"


@pytest.mark.fast
def test_curl_lines_use_the_full_address() -> None:
    """`:8000/predict` is httpie's shorthand (curl rejects it); `localhost` may be IPv6."""
    wrong = [
        f"{block.where}: {line[:70]}"
        for block in ALL
        if block.tag and block.tag.serve is not None
        for line in block.curl_lines()
        if "http://127.0.0.1:8000" not in line or "localhost" in line
    ]
    assert not wrong, "write http://127.0.0.1:8000 in curl lines:\n" + "\n".join(wrong)


@pytest.mark.fast
def test_the_rules_are_checked_for_real() -> None:
    """The parser sees this project's docs: tagged curl lines, outputs, runs."""
    assert GROUPS, "no <!-- docs-test: serve ... --> block found"
    assert any(block.outputs for group in GROUPS.values() for block in group)
    assert any(block.tag and block.tag.run for block in ALL)


@pytest.mark.fast
def test_copied_tables_match_their_source() -> None:
    checked = 0
    for block_page in pages():
        lines = block_page.read_text().splitlines()
        for number, line in enumerate(lines):
            match = TAG.match(line)
            if not match or not match.group(1).strip().startswith("copied from "):
                continue
            source = match.group(1).strip()[len("copied from ") :].strip()
            text = (ROOT / source).read_text()
            rows = []
            for row in lines[number + 1 :]:
                if not row.startswith("|"):
                    break
                rows.append(row)
            assert rows, f"{block_page.name}:{number + 1}: no table after the comment"
            missing = [row for row in rows if row not in text]
            assert not missing, f"{block_page.name}: rows not in {source}: {missing}"
            checked += 1
    assert checked, "no copied table found"


# --- real: run them -------------------------------------------------------------------


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _setup(workdir: Path, name: str) -> None:
    """The files a block's ``setup`` names: small, made here, nothing downloaded."""
    target = workdir / name
    if target.exists():
        return
    if name.endswith((".jpg", ".png")):
        from examples.demo_models import photo

        target.write_bytes(photo(320, 240, seed=3, fmt="PNG" if name.endswith(".png") else "JPEG"))
    elif name.endswith(".txt"):
        target.write_text("A cat sat on the mat.\n")
    elif name.endswith(".pt2"):
        import torch

        from worker.model.demo import build_demo_model

        batch = torch.export.Dim("batch", min=1, max=1024)
        example = (torch.zeros(2, 16),)
        program = torch.export.export(build_demo_model(), example, dynamic_shapes=({0: batch},))
        torch.export.save(program, target)
    else:
        raise AssertionError(f"no setup for {name!r}: add one to tests/test_docs_commands.py")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for every command and server, after the run and file blocks."""
    folder = tmp_path_factory.mktemp("docs")
    for block in ALL:
        if block.tag and block.tag.file:
            (folder / block.tag.file).write_text(block.text + "\n")
        if block.tag and block.tag.run:
            for command in block.commands():
                result = subprocess.run(
                    ["bash", "-euo", "pipefail", "-c", command],
                    cwd=folder,
                    env=_env(),
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                assert result.returncode == 0, (
                    f"{block.where}: `{command}` exited {result.returncode}:\n"
                    f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
                )
    return folder


class DocServer:
    """`torchpool serve ARGS` in the docs' folder, as a reader would start it."""

    def __init__(self, args: tuple[str, ...], workdir: Path) -> None:
        self.args = args
        self.port = free_port()
        self.log_path = workdir / f"serve-{self.port}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--port", str(self.port), *args],
            cwd=workdir,
            env=_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"torchpool serve exited with {self.proc.returncode}:\n"
                f"{self.log_path.read_text(errors='replace')[-4000:]}"
            )
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/health/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def server(request: pytest.FixtureRequest, workdir: Path) -> Iterator[DocServer]:
    started = DocServer(request.param, workdir)
    try:
        wait_for(started.ready, BOOT_TIMEOUT_S, f"torchpool serve {' '.join(request.param)}", 0.2)
        yield started
    finally:
        started.stop()


def _curl(line: str, port: int, workdir: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run one documented curl line verbatim (its address moved to ``port``)."""
    body = workdir / "answer.body"
    wrapper = 'curl() { command curl -sS -o "$DOCS_ANSWER" -w "%{http_code}" "$@"; }\n'
    result = subprocess.run(
        ["bash", "-c", wrapper + line.replace("127.0.0.1:8000", f"127.0.0.1:{port}")],
        cwd=workdir,
        env=_env({**env, "DOCS_ANSWER": str(body)}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"`{line}` failed: {result.stderr}"
    return int(result.stdout.strip()[-3:]), body.read_text(errors="replace")


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, float) or isinstance(got, float):
        return isinstance(got, int | float) and math.isclose(got, want, rel_tol=1e-6)
    if isinstance(want, dict):
        return (
            isinstance(got, dict)
            and got.keys() == want.keys()
            and all(_same(got[k], want[k]) for k in want)
        )
    if isinstance(want, list):
        return (
            isinstance(got, list)
            and len(got) == len(want)
            and all(_same(g, w) for g, w in zip(got, want, strict=True))
        )
    return bool(got == want)


@pytest.mark.skipif(CURL is None, reason="curl is needed to run the docs' curl lines")
@pytest.mark.parametrize(
    "server", list(GROUPS), ids=[" ".join(args) or "(none)" for args in GROUPS], indirect=True
)
def test_curl_lines_answer_as_documented(server: DocServer, workdir: Path) -> None:
    ran = 0
    for block in GROUPS[server.args]:
        assert block.tag is not None
        for name in block.tag.setup:
            _setup(workdir, name)
        answer = ""
        for line in block.curl_lines():
            status, answer = _curl(line, server.port, workdir, block.tag.env)
            wanted = block.tag.status
            ok = status == wanted if wanted else 200 <= status < 300
            assert ok, f"{block.where}: `{line[:80]}` answered {status}: {answer[:500]}"
            if answer.startswith(("data:", "event:")):  # a stream: 200 came before its events
                assert "event: error" not in answer, f"{block.where}: the stream failed: {answer}"
            ran += 1
        for output in block.outputs:
            assert _same(json.loads(answer), json.loads(output.text)), (
                f"{output.where}: documented answer differs from the real one:\n{answer}"
            )
    assert ran
