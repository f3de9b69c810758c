"""Real tier: every model source, served by two CPU workers, answers exactly
what the same model computes in-process."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from tests.conftest import Server, wait_for
from tests.zoo import ROW, build_all

ROWS = [[math.sin(i * ROW + j) for j in range(ROW)] for i in range(4)]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_all(tmp_path_factory.mktemp("zoo"))


def reference(module: torch.nn.Module) -> Any:
    with torch.inference_mode():
        out = module(torch.tensor(ROWS))
    if isinstance(out, dict):
        return {key: value.tolist() for key, value in out.items()}
    return out.tolist()


def assert_close(got: Any, want: Any) -> None:
    if isinstance(want, dict):
        assert set(got) == set(want)
        for key in want:
            assert_close(got[key], want[key])
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            assert_close(a, b)
    else:
        assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-5), (got, want)


def predict(server: Server) -> Any:
    response = server.predict({"input_tensor": ROWS})
    assert response.status_code == 200, response.text
    return response.json()["prediction"]


def test_torchscript(serve: Callable[..., Server], zoo: dict[str, Any]) -> None:
    server = serve("--model", str(zoo["torchscript"]), "--workers", "2", ready=2)
    assert_close(predict(server), reference(zoo["model"]))


def test_torch_export_program_carries_its_shape(
    serve: Callable[..., Server], zoo: dict[str, Any]
) -> None:
    server = serve("--model", str(zoo["exported"]), "--workers", "2", ready=2)
    assert_close(predict(server), reference(zoo["model"]))
    wrong = server.predict({"input_tensor": [[1.0] * (ROW + 1)]})
    assert wrong.status_code == 422, wrong.text
    assert wrong.json()["expected"] == [-1, ROW]


def test_state_dict_with_model_class(serve: Callable[..., Server], zoo: dict[str, Any]) -> None:
    server = serve(
        "--model", str(zoo["weights"]), "--model-class", "tests.zoo:TinyMLP",
        "--model-kwargs", '{"hidden": 8}', "--workers", "2", ready=2,
    )  # fmt: skip
    assert_close(predict(server), reference(zoo["model"]))


def test_dict_outputs_map_to_json_objects(
    serve: Callable[..., Server], zoo: dict[str, Any]
) -> None:
    server = serve(
        "--model", str(zoo["head_weights"]), "--model-class", "tests.zoo:TwoHeads",
        "--workers", "2", ready=2,
    )  # fmt: skip
    got = predict(server)
    assert set(got) == {"logits", "argmax"}
    assert_close(got, reference(zoo["heads"]))


def test_trusted_pickle(serve: Callable[..., Server], zoo: dict[str, Any]) -> None:
    server = serve("--model", str(zoo["pickled"]), "--trust-pickle", "--workers", "2", ready=2)
    assert_close(predict(server), reference(zoo["model"]))


def test_handler(serve: Callable[..., Server]) -> None:
    server = serve(
        "--handler", "tests.zoo:ScaleHandler", "--model-kwargs", '{"factor": 3.0}',
        "--workers", "2", ready=2,
    )  # fmt: skip
    want = [3.0 * sum(row) for row in ROWS]
    assert_close(predict(server), want)
    wrong = server.predict({"input_tensor": [[1.0] * 3]})
    assert wrong.status_code == 422


def test_declared_input_shape_is_checked_before_forward(
    serve: Callable[..., Server], zoo: dict[str, Any]
) -> None:
    server = serve("--model", str(zoo["torchscript"]), "--input-shape", str(ROW), "--workers", "1")
    wrong = server.predict({"input_tensor": [[1.0] * 5]})
    assert wrong.status_code == 422, wrong.text
    assert wrong.json()["received"] == [1, 5]


def test_model_failure_is_500_and_the_worker_lives_on(
    serve: Callable[..., Server], zoo: dict[str, Any]
) -> None:
    # No declared shape: a wrong row width reaches forward and fails there.
    server = serve("--model", str(zoo["torchscript"]), "--workers", "1")
    pids = server.worker_pids()
    failed = server.predict({"input_tensor": [[1.0] * 5]})
    assert failed.status_code == 500, failed.text
    body = failed.json()
    assert body["code"] == "model_error"
    # The model's own message, without TorchScript's traceback or a server path in it;
    # the traceback is in the log under the answer's error id.
    assert "mat1 and mat2 shapes cannot be multiplied" in body["error"], body
    assert "Traceback" not in body["error"] and "site-packages" not in body["error"], body
    assert "/" not in body["error"].replace("...", ""), body
    wait_for(lambda: f"model error {body['error_id']}" in server.log(), 10, "the logged error")
    assert "Traceback of TorchScript" in server.log().split(body["error_id"], 1)[1]
    assert server.worker_pids() == pids
    assert_close(predict(server), reference(zoo["model"]))
