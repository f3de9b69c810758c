"""torchpool's own exceptions, and the one place where they meet HTTP.

    TorchpoolError                 500 internal
     ├── RequestError              400 bad_request         the client sent something unusable
     │    ├── ShapeMismatch        422 shape_mismatch      well-formed, not what the model takes
     │    ├── PayloadTooLarge      413 payload_too_large
     │    └── UnsupportedMediaType 415 unsupported_media_type
     ├── ModelFailure              500 model_error         the model raised on valid input
     ├── Unavailable               503 unavailable         no ready worker, or the queue is full
     ├── DeadlineExceeded          504 deadline_exceeded
     ├── ClientClosed              499 client_closed       the client left; nobody reads this
     └── ModelLoadError            --- model_load_failed   the model cannot load (startup only)

Workers send the ``code`` string of an error over the wire; the gateway turns it
back into the class with :func:`error_from_code` and into a status with
``.status``. Nothing else in the project decides a status code.
"""

from __future__ import annotations

from typing import Any, ClassVar


class TorchpoolError(Exception):
    """Base of every error torchpool raises on purpose."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        # Extra JSON fields for the client, e.g. expected/received shapes.
        self.details = details

    def to_json(self) -> dict[str, Any]:
        """The HTTP error body: a human-readable message plus a stable code."""
        return {"error": self.message, "code": self.code, **self.details}


class RequestError(TorchpoolError):
    status = 400
    code = "bad_request"


class ShapeMismatch(RequestError):
    status = 422
    code = "shape_mismatch"


class PayloadTooLarge(RequestError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(RequestError):
    status = 415
    code = "unsupported_media_type"


class ModelFailure(TorchpoolError):
    status = 500
    code = "model_error"


class Unavailable(TorchpoolError):
    status = 503
    code = "unavailable"

    def __init__(self, message: str, retry_after_s: int = 1, **details: Any) -> None:
        super().__init__(message, **details)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(TorchpoolError):
    status = 504
    code = "deadline_exceeded"


class ClientClosed(TorchpoolError):
    """The client disconnected while its request waited (nginx's 499)."""

    status = 499
    code = "client_closed"


class ModelLoadError(TorchpoolError):
    """The model cannot be loaded at all; raised at startup, never per request."""

    code = "model_load_failed"


_BY_CODE: dict[str, type[TorchpoolError]] = {
    cls.code: cls
    for cls in (
        TorchpoolError,
        RequestError,
        ShapeMismatch,
        PayloadTooLarge,
        UnsupportedMediaType,
        ModelFailure,
        Unavailable,
        DeadlineExceeded,
        ClientClosed,
        ModelLoadError,
    )
}


def error_from_code(code: str, message: str, **details: Any) -> TorchpoolError:
    """Rebuild an error that crossed the wire; an unknown code is an internal error."""
    return _BY_CODE.get(code, TorchpoolError)(message, **details)
