"""Error classes: one status and one stable code each, and their trip over the wire."""

from __future__ import annotations

import pytest

from shared.errors import (
    DeadlineExceeded,
    ModelFailure,
    ModelLoadError,
    PayloadTooLarge,
    RequestError,
    ShapeMismatch,
    TorchpoolError,
    Unavailable,
    UnsupportedMediaType,
    error_from_code,
)

pytestmark = pytest.mark.fast

TABLE: list[tuple[type[TorchpoolError], int, str]] = [
    (TorchpoolError, 500, "internal"),
    (RequestError, 400, "bad_request"),
    (ShapeMismatch, 422, "shape_mismatch"),
    (PayloadTooLarge, 413, "payload_too_large"),
    (UnsupportedMediaType, 415, "unsupported_media_type"),
    (ModelFailure, 500, "model_error"),
    (Unavailable, 503, "unavailable"),
    (DeadlineExceeded, 504, "deadline_exceeded"),
    (ModelLoadError, 500, "model_load_failed"),
]


@pytest.mark.parametrize(("cls", "status", "code"), TABLE, ids=lambda v: getattr(v, "__name__", v))
def test_status_and_code(cls: type[TorchpoolError], status: int, code: str) -> None:
    assert cls.status == status
    assert cls.code == code
    error = cls("something went wrong")
    assert error.status == status
    assert str(error) == "something went wrong"
    assert error.to_json() == {"error": "something went wrong", "code": code}


def test_codes_are_unique() -> None:
    codes = [code for _, _, code in TABLE]
    assert len(set(codes)) == len(codes)


def test_client_errors_are_request_errors() -> None:
    client: tuple[type[TorchpoolError], ...] = (
        ShapeMismatch,
        PayloadTooLarge,
        UnsupportedMediaType,
    )
    other: tuple[type[TorchpoolError], ...] = (
        ModelFailure,
        Unavailable,
        DeadlineExceeded,
        ModelLoadError,
    )
    for cls in client:
        assert issubclass(cls, RequestError)
    for cls in other:
        assert not issubclass(cls, RequestError)
        assert issubclass(cls, TorchpoolError)


@pytest.mark.parametrize(("cls", "status", "code"), TABLE, ids=lambda v: getattr(v, "__name__", v))
def test_error_from_code_round_trip(cls: type[TorchpoolError], status: int, code: str) -> None:
    rebuilt = error_from_code(code, "over the wire", where="worker 1")
    assert type(rebuilt) is cls
    assert rebuilt.status == status
    assert rebuilt.message == "over the wire"
    assert rebuilt.details == {"where": "worker 1"}


def test_unknown_code_is_an_internal_error() -> None:
    error = error_from_code("no_such_code", "strange")
    assert type(error) is TorchpoolError
    assert error.status == 500
    assert error.to_json() == {"error": "strange", "code": "internal"}


def test_to_json_includes_details() -> None:
    error = ShapeMismatch(
        "expected shape [N, 16], received [2, 15]", expected=[-1, 16], received=[2, 15]
    )
    assert error.to_json() == {
        "error": "expected shape [N, 16], received [2, 15]",
        "code": "shape_mismatch",
        "expected": [-1, 16],
        "received": [2, 15],
    }
    rebuilt = error_from_code(error.code, error.message, **error.details)
    assert rebuilt.to_json() == error.to_json()


def test_unavailable_carries_retry_after() -> None:
    assert Unavailable("queue full").retry_after_s == 1
    error = Unavailable("loading", retry_after_s=5, ready=0)
    assert error.retry_after_s == 5
    assert error.to_json() == {"error": "loading", "code": "unavailable", "ready": 0}
