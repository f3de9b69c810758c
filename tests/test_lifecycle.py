"""Real tier: how `torchpool serve` starts, refuses, stops and dies."""

from __future__ import annotations

import functools
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, Server, gone, wait_for


def run_serve(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run `torchpool serve` expecting it to exit by itself."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", "--port", "0", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


# Logged once the runtime has started, before any worker is spawned: its absence
# says that none was (test_clean_shutdown_exits_zero checks it is logged).
RUNTIME_STARTED = "workers connect to"


def one_line_reason(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    reasons = [line for line in result.stderr.splitlines() if line.startswith("torchpool: error")]
    assert len(reasons) == 1, result.stderr
    return reasons[0]


def test_sigterm_drains_and_leaves_nothing_behind(serve: Callable[..., Server]) -> None:
    server = serve("--workers", "2", ready=2)
    workers = server.worker_pids()
    assert len(workers) == 2
    endpoint = re.search(r"ipc://(\S+)/gateway\.sock", server.log())
    assert endpoint is not None, server.log()
    rundir = Path(endpoint.group(1))
    assert rundir.is_dir()
    assert server.stop() == 0, server.log()
    for pid in workers:
        assert gone(pid), f"worker {pid} outlived the gateway"
    assert not rundir.exists(), "the runtime directory was left behind"


def test_gateway_sigkill_leaves_no_orphans(serve: Callable[..., Server]) -> None:
    server = serve("--workers", "2", ready=2)
    workers = server.worker_pids()
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    for pid in workers:
        wait_for(functools.partial(gone, pid), 10.0, f"orphaned worker {pid} to exit")


def test_missing_model_file_is_refused_before_spawning() -> None:
    result = run_serve("--model", "/nonexistent/model.pt")
    assert "does not exist" in one_line_reason(result)
    assert RUNTIME_STARTED not in result.stderr  # refused before spawning: none was


def test_pickled_module_is_refused_without_trust_pickle(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(torch.nn.Linear(4, 2), path)
    result = run_serve("--model", str(path), "--workers", "2")
    reason = one_line_reason(result)
    assert "--trust-pickle" in reason
    assert RUNTIME_STARTED not in result.stderr  # refused before spawning: none was


def test_bad_model_class_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(4, 2).state_dict(), path)
    result = run_serve("--model", str(path), "--model-class", "tests.zoo:NoSuchClass")
    assert "NoSuchClass" in one_line_reason(result)


def test_state_dict_mismatch_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(7, 2).state_dict(), path)
    result = run_serve(
        "--model", str(path), "--model-class", "tests.zoo:TinyMLP",
        "--model-kwargs", '{"inputs": 16, "hidden": 8, "outputs": 4}',
    )  # fmt: skip
    one_line_reason(result)


def test_bad_flag_value_names_the_flag() -> None:
    result = run_serve("--workers", "two")
    assert "--workers" in one_line_reason(result)


def test_env_variable_sets_a_flag(serve: Callable[..., Server]) -> None:
    server = serve(env={"TORCHPOOL_WORKERS": "1"})
    assert server.health()["total_workers"] == 1


def test_flag_wins_over_env(serve: Callable[..., Server]) -> None:
    server = serve("--workers", "1", env={"TORCHPOOL_WORKERS": "2"})
    assert server.health()["total_workers"] == 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_clean_shutdown_exits_zero(serve: Callable[..., Server], sig: signal.Signals) -> None:
    server = serve("--workers", "1")
    server.proc.send_signal(sig)
    assert server.proc.wait(30) == 0, server.log()
    assert RUNTIME_STARTED in server.log()


def test_gateway_only_settings_in_the_environment_do_not_reach_workers(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    # A gateway configured for remote workers through the environment: its CURVE
    # secret must not leak into local workers (which would refuse to boot).
    keys = tmp_path / "keys"
    torchpool = str(Path(sys.executable).parent / "torchpool")
    subprocess.run([torchpool, "keys", "server", "--dir", str(keys)], check=True)
    (keys / "allow").mkdir()
    env = {
        "TORCHPOOL_BIND": "tcp://127.0.0.1:0",
        "TORCHPOOL_CURVE_SECRET": str(keys / "server.key_secret"),
        "TORCHPOOL_CURVE_ALLOW": str(keys / "allow"),
        "TORCHPOOL_GPU": "0",
    }
    server = serve("--workers", "1", env=env)
    assert server.health()["workers"][0]["device"] == "cpu"
    assert server.predict({"input_tensor": [[0.0] * 16]}).status_code == 200
