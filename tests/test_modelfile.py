"""shared.modelfile: what a model file is, told without torch and without unpickling.

Fast tier for the sniffer on files torch really writes and on files that are
no model at all; one real tier check that `torchpool serve` refuses the
latter in one line before it spawns a worker.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from shared import modelfile
from shared.errors import ModelLoadError
from tests.conftest import ROOT
from tests.models import TinyNet

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

X = torch.zeros(2, 8)


class Marker:
    """Unpickling this creates a folder: proof, if it exists, that something ran it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return os.mkdir, (str(self.path),)


def write_torchscript(path: Path) -> None:
    torch.jit.trace(TinyNet().eval(), X).save(str(path))  # type: ignore[no-untyped-call]


def write_export(path: Path) -> None:
    torch.export.save(torch.export.export(TinyNet().eval(), (X,)), path)


def write_checkpoint(path: Path) -> None:
    state = TinyNet().state_dict()
    torch.save({"state_dict": state, "epoch": 3, "lr": 0.1, "tags": {"a", "b"}}, path)


def write_odd_tensors(path: Path) -> None:
    torch.save({"h": torch.zeros(2, dtype=torch.bfloat16), "d": torch.device("cpu")}, path)


MODELS: dict[str, tuple[Callable[[Path], None], str]] = {
    "torchscript": (write_torchscript, modelfile.TORCHSCRIPT),
    "export": (write_export, modelfile.EXPORT),
    "state_dict": (lambda p: torch.save(TinyNet().state_dict(), p), modelfile.TENSORS),
    "checkpoint": (write_checkpoint, modelfile.TENSORS),
    "bfloat16-and-device": (write_odd_tensors, modelfile.TENSORS),
    "legacy-state_dict": (
        lambda p: torch.save(TinyNet().state_dict(), p, _use_new_zipfile_serialization=False),
        modelfile.TENSORS,
    ),
    "protocol-4-state_dict": (
        lambda p: torch.save(TinyNet().state_dict(), p, pickle_protocol=4),
        modelfile.TENSORS,
    ),
    "module": (lambda p: torch.save(TinyNet(), p), modelfile.PICKLE),
    "legacy-module": (
        lambda p: torch.save(TinyNet(), p, _use_new_zipfile_serialization=False),
        modelfile.PICKLE,
    ),
    "protocol-4-module": (lambda p: torch.save(TinyNet(), p, pickle_protocol=4), modelfile.PICKLE),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.fast
def test_each_kind_is_recognised(tmp_path: Path, name: str) -> None:
    write, kind = MODELS[name]
    path = tmp_path / "model.pt"
    write(path)
    found = modelfile.sniff(path)
    assert found.kind == kind
    assert found.legacy == name.startswith("legacy")
    if kind == modelfile.PICKLE:
        assert found.code[0] == "tests.models.TinyNet"
        assert "torch.nn.modules.linear.Linear" in found.code
    else:
        assert found.code == ()


@pytest.mark.fast
def test_sniffing_runs_nothing_the_pickle_names(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(1), "payload": Marker(marker)}, path)
    found = modelfile.sniff(path)
    assert found.kind == modelfile.PICKLE and found.code == ("posix.mkdir",)
    with pytest.raises(ModelLoadError, match=r"pickled Python object \(posix\.mkdir\)"):
        modelfile.check(path, model_class=False, trust_pickle=False)
    assert not marker.exists()


def truncated_zip(path: Path) -> None:
    torch.save(TinyNet().state_dict(), path)
    path.write_bytes(path.read_bytes()[:300])


def foreign_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes/readme.txt", "hello")


def bare_pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))


NOT_MODELS: dict[str, tuple[Callable[[Path], Any], str]] = {
    "random-bytes": (lambda p: p.write_bytes(os.urandom(4096)), "binary data of an unknown kind"),
    "empty": (lambda p: p.write_bytes(b""), "is empty"),
    "text": (lambda p: p.write_text("weights: [1, 2, 3]\n"), "is a text file"),
    "truncated-zip": (truncated_zip, "truncated or damaged zip archive"),
    "foreign-zip": (foreign_zip, "zip archive that torch did not write"),
    "bare-pickle": (bare_pickle, "Python pickle, not a torch.save file"),
    "damaged-pickle": (lambda p: p.write_bytes(b"\x80\x02junk"), "damaged pickle"),
    "folder": (lambda p: p.mkdir(), "is a folder"),
}


@pytest.mark.parametrize("name", list(NOT_MODELS))
@pytest.mark.fast
def test_what_is_no_model_says_so(tmp_path: Path, name: str) -> None:
    make, needle = NOT_MODELS[name]
    path = tmp_path / "model.pt"
    make(path)
    with pytest.raises(ModelLoadError) as info:
        modelfile.sniff(path)
    message = info.value.message
    assert needle in message and str(path) in message and "\n" not in message
    assert "arbitrary code" not in message
    assert message.endswith(modelfile.READS)


@pytest.mark.parametrize(
    ("name", "flags", "needle"),
    [
        ("torchscript", {"model_class": True}, "drop --model-class"),
        ("export", {"model_class": True}, "drop --model-class"),
        ("module", {"model_class": True}, "not a plain state_dict"),
        ("state_dict", {}, "pass --model-class"),
        ("module", {}, "--trust-pickle"),
    ],
)
@pytest.mark.fast
def test_check_refuses_what_the_flags_cannot_load(
    tmp_path: Path, name: str, flags: dict[str, bool], needle: str
) -> None:
    path = tmp_path / "model.pt"
    MODELS[name][0](path)
    with pytest.raises(ModelLoadError, match=needle):
        modelfile.check(path, model_class=flags.get("model_class", False), trust_pickle=False)


@pytest.mark.parametrize(
    ("name", "model_class", "trust_pickle"),
    [("torchscript", False, False), ("state_dict", True, False), ("module", False, True)],
)
@pytest.mark.fast
def test_check_passes_what_the_flags_can_load(
    tmp_path: Path, name: str, model_class: bool, trust_pickle: bool
) -> None:
    path = tmp_path / "model.pt"
    MODELS[name][0](path)
    found = modelfile.check(path, model_class=model_class, trust_pickle=trust_pickle)
    assert found.kind == MODELS[name][1]


@pytest.mark.parametrize("name", ["random-bytes", "empty", "text", "truncated-zip", "folder"])
def test_serve_refuses_no_model_before_spawning(tmp_path: Path, name: str) -> None:
    make, needle = NOT_MODELS[name]
    path = tmp_path / "model.pt"
    make(path)
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--port", "0", "--workers", "2", "--model", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("torchpool: error: cannot serve: ") and needle in lines[0]
    # The runtime never started: no endpoint for workers, so none was spawned.
    assert "workers connect to" not in result.stderr
