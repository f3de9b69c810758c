"""Fast tier: what a client reads when the model raises (no traceback, no server paths)."""

from __future__ import annotations

import pytest

from worker.serve.failure import MAX_MESSAGE, describe, model_failure

pytestmark = pytest.mark.fast

TORCHSCRIPT = (
    "The following operation failed in the TorchScript interpreter.\n"
    "Traceback of TorchScript, serialized code (most recent call last):\n"
    '  File "code/__torch__/torch/nn/modules/linear.py", line 14, in forward\n'
    "    return torch.linear(input, weight, bias)\n"
    "           ~~~~~~~~~~~~ <--- HERE\n\n"
    "Traceback of TorchScript, original code (most recent call last):\n"
    '  File "/srv/app/.venv/lib/python3.11/site-packages/torch/nn/modules/linear.py", '
    "line 134, in forward\n"
    "        return F.linear(input, self.weight, self.bias)\n"
    "RuntimeError: mat1 and mat2 shapes cannot be multiplied (1x3 and 4x8)\n"
)


def test_a_torchscript_error_keeps_only_the_line_that_states_it() -> None:
    text = describe(RuntimeError(TORCHSCRIPT))
    assert text == "RuntimeError: mat1 and mat2 shapes cannot be multiplied (1x3 and 4x8)"


def test_a_plain_message_keeps_its_type_and_text() -> None:
    assert describe(ValueError("bad row 3")) == "ValueError: bad row 3"


def test_absolute_paths_keep_only_their_last_component() -> None:
    exc = FileNotFoundError("no such file: /srv/models/secret/weights.bin (and /tmp/x)")
    text = describe(exc)
    assert text == "FileNotFoundError: no such file: .../weights.bin (and .../x)"
    assert "/srv" not in text


def test_a_url_is_not_taken_for_a_path() -> None:
    text = describe(OSError("cannot reach https://example.org/a/b"))
    assert text == "OSError: cannot reach https://example.org/a/b"


def test_long_messages_are_cut() -> None:
    assert len(describe(ValueError("x" * 10_000))) == MAX_MESSAGE + len("...")


def test_the_failure_carries_an_error_id_and_logs_the_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    try:
        raise RuntimeError(TORCHSCRIPT)
    except RuntimeError as exc:
        failure = model_failure(exc)
    error_id = failure.details["error_id"]
    assert failure.to_json()["error_id"] == error_id
    assert f"model error {error_id}" in caplog.text
    assert "Traceback of TorchScript" in caplog.text
