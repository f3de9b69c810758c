"""torchpool's own exceptions, and the one place where they meet HTTP.

    TorchpoolError                 500 internal
     ├── RequestError              400 bad_request         the client sent something unusable
     │    ├── ShapeMismatch        422 shape_mismatch      not the shape the model takes
     │    ├── InvalidValue         422 invalid_value       a number the model's dtype can't hold
     │    ├── PayloadTooLarge      413 payload_too_large
     │    ├── ModelNotFound        404 model_not_found     no such model (or /v2 version)
     │    ├── Conflict             409 conflict            e.g. loading a model whose name is taken
     │    └── UnsupportedMediaType 415 unsupported_media_type
     ├── Unauthorized              401 unauthorized        missing or wrong bearer token
     ├── ModelFailure              500 model_error         the model raised on valid input
     ├── Unavailable               503 unavailable         no ready worker, or the queue is full
     │    └── QueueFull            503 unavailable         the queue is full (gRPC tells it apart)
     ├── DeadlineExceeded          504 deadline_exceeded
     ├── ClientClosed              499 client_closed       the client left; nobody reads this
     └── ModelLoadError            500 model_load_failed   the model cannot load (at start,
                                                           or a load/reload at run time)

Workers send the ``code`` string of an error over the wire; the gateway turns it
back into the class with :func:`error_from_code` and into a status with
``.status``. Nothing else in the project decides a status code; the Open
Inference Protocol's routes (/v2) take theirs from :func:`v2_status`, its gRPC
service its status codes from :mod:`gateway.api.grpc.status`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Final

# Why a request, a probe or a reload is refused while the gateway stops (a 503).
SHUTTING_DOWN: Final = "the server is shutting down"


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

    def to_v2_json(self) -> dict[str, Any]:
        """The error body of the Open Inference Protocol's routes (/v2): the message alone."""
        return {"error": self.message}


class RequestError(TorchpoolError):
    status = 400
    code = "bad_request"


class ShapeMismatch(RequestError):
    status = 422
    code = "shape_mismatch"


class InvalidValue(RequestError):
    status = 422
    code = "invalid_value"


class PayloadTooLarge(RequestError):
    status = 413
    code = "payload_too_large"


class ModelNotFound(RequestError):
    status = 404
    code = "model_not_found"


class Conflict(RequestError):
    status = 409
    code = "conflict"


class UnsupportedMediaType(RequestError):
    status = 415
    code = "unsupported_media_type"


class Unauthorized(TorchpoolError):
    status = 401
    code = "unauthorized"


class ModelFailure(TorchpoolError):
    status = 500
    code = "model_error"


class Unavailable(TorchpoolError):
    status = 503
    code = "unavailable"

    def __init__(self, message: str, retry_after_s: int = 1, **details: Any) -> None:
        super().__init__(message, **details)
        self.retry_after_s = retry_after_s


class QueueFull(Unavailable):
    """Every worker is busy and the queue holds --queue-size requests: 503 as any
    Unavailable over HTTP; gRPC tells it apart (RESOURCE_EXHAUSTED, not UNAVAILABLE)."""


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
        InvalidValue,
        PayloadTooLarge,
        ModelNotFound,
        Conflict,
        UnsupportedMediaType,
        Unauthorized,
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


def v2_status(error: TorchpoolError) -> int:
    """The status of ``error`` on the Open Inference Protocol routes (/v2).

    That protocol answers bad input with 400, a shape that does not fit included
    (422 elsewhere); an unknown model is 404, an oversized body still 413.
    """
    if isinstance(error, RequestError) and not isinstance(error, PayloadTooLarge | ModelNotFound):
        return 400
    return error.status
