"""torchpool's errors as gRPC status codes: the one place where they meet gRPC.

    ModelNotFound            NOT_FOUND            unknown model or version
    PayloadTooLarge          RESOURCE_EXHAUSTED   past --max-body-mb (as grpc's own limit)
    QueueFull                RESOURCE_EXHAUSTED   every worker busy, the queue full
    Conflict                 ALREADY_EXISTS       loading a model whose name is served
    RequestError (others)    INVALID_ARGUMENT     bad input: shape, datatype, values, ...
    Unauthorized             UNAUTHENTICATED      no valid ``authorization: Bearer KEY``
    Unavailable              UNAVAILABLE          no ready worker, a worker died, draining
    DeadlineExceeded         DEADLINE_EXCEEDED    past the request's deadline
    ClientClosed             CANCELLED
    Unimplemented            UNIMPLEMENTED        the repository without --admin-token
    ModelFailure, others     INTERNAL             the model raised on valid input

The message is the REST error's ``error`` text, word for word.
"""

from __future__ import annotations

from typing import Final

import grpc

from shared.errors import (
    ClientClosed,
    Conflict,
    DeadlineExceeded,
    ModelNotFound,
    PayloadTooLarge,
    QueueFull,
    RequestError,
    TorchpoolError,
    Unauthorized,
    Unavailable,
)


class Unimplemented(TorchpoolError):
    """A call this server does not serve as configured (the repository without an admin token)."""


# Most specific first: the first class an error is an instance of decides.
_CODES: Final[tuple[tuple[type[TorchpoolError], grpc.StatusCode], ...]] = (
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (PayloadTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Conflict, grpc.StatusCode.ALREADY_EXISTS),
    (RequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (Unauthorized, grpc.StatusCode.UNAUTHENTICATED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ClientClosed, grpc.StatusCode.CANCELLED),
    (Unimplemented, grpc.StatusCode.UNIMPLEMENTED),
)


def status_code(error: TorchpoolError) -> grpc.StatusCode:
    """The gRPC status code of ``error`` (INTERNAL for a model failure and anything else)."""
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL
