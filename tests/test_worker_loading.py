"""Fast tier: every model source loads in-process and computes what the module does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from shared import modelfile
from shared.config import ModelSettings
from shared.errors import ModelLoadError
from tests.models import TinyNet
from worker.model.demo import build_demo_model
from worker.model.loading import LoadedModel, load_model, warm_up

pytestmark = [
    pytest.mark.fast,
    pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning"),
]

CPU = torch.device("cpu")
X = torch.linspace(-1, 1, 5 * 8).reshape(5, 8)


def load(**flags: Any) -> LoadedModel:
    return load_model(ModelSettings(**flags), CPU)


def run(model: LoadedModel, batch: torch.Tensor) -> Any:
    with torch.inference_mode():
        return model.run(batch)


def expected(x: torch.Tensor = X) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = TinyNet()(x)
    return out


def save_torchscript(path: Path) -> None:
    traced = torch.jit.trace(TinyNet().eval(), X)  # type: ignore[no-untyped-call]
    traced.save(str(path))


def refused(**flags: Any) -> str:
    with pytest.raises(ModelLoadError) as info:
        load(**flags)
    message = info.value.message
    assert "\n" not in message
    return message


def test_demo_model_matches_in_process_build() -> None:
    model = load()
    assert model.source == "demo" and model.input_shape == (16,) and model.input_dtype == "float32"
    x = torch.randn(3, 16)
    with torch.inference_mode():
        want = build_demo_model()(x)
    torch.testing.assert_close(run(model, x), want)
    assert warm_up(model)


def test_torchscript(tmp_path: Path) -> None:
    path = tmp_path / "net.ts"
    save_torchscript(path)
    assert modelfile.sniff(path).kind == modelfile.TORCHSCRIPT
    model = load(model=str(path))
    assert model.source == "torchscript" and model.input_shape is None
    torch.testing.assert_close(run(model, X), expected())


def test_torch_export_with_dynamic_batch(tmp_path: Path) -> None:
    path = tmp_path / "net.pt2"
    batch = torch.export.Dim("batch", min=1, max=512)
    program = torch.export.export(TinyNet().eval(), (X,), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    assert modelfile.sniff(path).kind == modelfile.EXPORT
    model = load(model=str(path))
    assert model.source == "export" and model.input_shape == (8,)
    assert model.input_dtype == "float32"
    torch.testing.assert_close(run(model, X[:2]), expected(X[:2]))
    assert warm_up(model)


def test_input_shape_flag_overrides_the_program(tmp_path: Path) -> None:
    path = tmp_path / "net.ts"
    save_torchscript(path)
    model = load(model=str(path), input_shape=(8,), input_dtype="float64")
    assert model.input_shape == (8,) and model.input_dtype == "float64"


def test_state_dict_with_model_class(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(TinyNet().state_dict(), path)
    model = load(model=str(path), model_class="tests.models:TinyNet", model_kwargs={"seed": 5})
    assert model.source == "state_dict"
    torch.testing.assert_close(run(model, X), expected())


def test_state_dict_in_the_legacy_format(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(TinyNet().state_dict(), path, _use_new_zipfile_serialization=False)
    assert modelfile.sniff(path).kind == modelfile.TENSORS
    model = load(model=str(path), model_class="tests.models:TinyNet")
    torch.testing.assert_close(run(model, X), expected())


def test_state_dict_in_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": TinyNet().state_dict(), "epoch": 3}, path)
    model = load(model=str(path), model_class="tests.models:TinyNet")
    torch.testing.assert_close(run(model, X), expected())


def test_state_dict_mismatch_names_keys(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(TinyNet(in_features=5).state_dict(), path)
    message = refused(model=str(path), model_class="tests.models:TinyNet")
    assert "size mismatch" in message and "fc.weight" in message
    assert "[3, 5]" in message and "[3, 8]" in message
    torch.save({"other.weight": torch.zeros(1)}, path)
    message = refused(model=str(path), model_class="tests.models:TinyNet")
    assert "missing keys: fc.weight, fc.bias" in message
    assert "unexpected keys: other.weight" in message


def test_pickled_module_is_refused_without_trust(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(TinyNet(), path)
    message = refused(model=str(path))
    assert "pickled Python object (tests.models.TinyNet" in message
    assert "--trust-pickle" in message and "arbitrary code" in message and "TorchScript" in message


def test_pickled_module_with_trust(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(TinyNet(), path)
    model = load(model=str(path), trust_pickle=True)
    assert model.source == "pickle"
    torch.testing.assert_close(run(model, X), expected())


def test_plain_state_dict_needs_model_class(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(TinyNet().state_dict(), path)
    assert "--model-class" in refused(model=str(path))


def test_handler() -> None:
    model = load(handler="tests.models:DoubleHandler", model_kwargs={"width": 3})
    assert model.source == "handler" and model.input_shape == (3,)
    assert model.preprocess is not None and model.postprocess is not None
    batch = model.preprocess([[1.0, 2.0, 3.0]], "application/json")
    out = run(model, batch)
    torch.testing.assert_close(out, torch.tensor([[2.0, 4.0, 6.0]]))
    assert model.postprocess(out)["rows"] == 1


def test_handler_load_failure_is_one_line() -> None:
    message = refused(handler="tests.models:BrokenHandler")
    assert "load() failed" in message and "weights server unreachable" in message


def test_missing_file() -> None:
    assert "does not exist" in refused(model="/nonexistent/model.pt")


@pytest.mark.parametrize(
    ("class_path", "needle"),
    [
        ("tests.nosuchmodule:Net", "no module named 'tests.nosuchmodule'"),
        ("tests.models:NoSuchNet", "has no 'NoSuchNet'"),
    ],
)
def test_bad_class_path(tmp_path: Path, class_path: str, needle: str) -> None:
    path = tmp_path / "weights.pt"
    torch.save(TinyNet().state_dict(), path)
    assert needle in refused(model=str(path), model_class=class_path)


def test_bad_constructor_kwargs(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(TinyNet().state_dict(), path)
    message = refused(model=str(path), model_class="tests.models:TinyNet", model_kwargs={"x": 1})
    assert "building tests.models:TinyNet" in message and "TypeError" in message


def test_pickled_module_given_as_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(TinyNet(), path)
    message = refused(model=str(path), model_class="tests.models:TinyNet")
    assert "not a plain state_dict" in message and "tests.models.TinyNet" in message


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"not a model at all\n", "is a text file"),
        (b"", "is empty"),
        (bytes(range(256)) * 8, "binary data of an unknown kind"),
    ],
    ids=["text", "empty", "bytes"],
)
def test_garbage_file_says_what_it_is_not(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    message = refused(model=str(path))
    assert str(path) in message and needle in message
    assert "--trust-pickle" in message and "pickled nn.Module (with" in message  # the kinds read
    assert "arbitrary code" not in message


def test_folder_is_not_a_model(tmp_path: Path) -> None:
    assert "is a folder, not a model file" in refused(model=str(tmp_path))


def test_warm_up_failure_is_a_load_error(tmp_path: Path) -> None:
    path = tmp_path / "net.ts"
    save_torchscript(path)
    model = load(model=str(path), input_shape=(5,))
    with pytest.raises(ModelLoadError, match=r"warm-up forward .* \[1, 5\]"):
        warm_up(model)


def test_an_explicit_input_dtype_wins_over_the_models_own() -> None:
    from shared.config import WorkerSettings
    from worker.model.loading import load_model

    declared = load_model(
        WorkerSettings(connect="ipc:///unused", handler="tests.zoo:CountHandler"),
        torch.device("cpu"),
    )
    assert declared.input_dtype == "int64"
    explicit = load_model(
        WorkerSettings(
            connect="ipc:///unused", handler="tests.zoo:CountHandler", input_dtype="float32"
        ),
        torch.device("cpu"),
    )
    assert explicit.input_dtype == "float32"
