"""A model that raised, described to the client without its traceback.

The client gets the exception's type and its own message: for an exception
whose message carries a traceback (TorchScript puts its whole interpreter
stack in ``str(exc)``, with paths into site-packages), only the line that
states the error. Absolute file paths keep just their last component. The
full traceback goes to the worker's log under an error id, and the answer
carries that id, so an operator can find one from the other.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import traceback
from typing import Final

from shared.errors import ModelFailure

log = logging.getLogger("torchpool.worker")

# Message of a model exception in a reply; long enough for a real shape error.
MAX_MESSAGE: Final = 2000

# Lines that open a traceback inside an exception's message.
_TRACEBACK = re.compile(r"^\s*Traceback\b|^\s*File \"", re.MULTILINE)
# "RuntimeError: ..." as the last line of such a message: the error itself.
_STATED = re.compile(r"^(?:[A-Za-z_][\w.]*)(?:Error|Exception|Warning|Interrupt|Exit): ")
# An absolute path of two or more components (not a URL's "//host").
_PATH = re.compile(r"(?<![\w:/.])(?:/[\w.+@~-]+){2,}/?")


def model_failure(exc: BaseException) -> ModelFailure:
    """The 500 for a model that raised; the traceback is logged under ``error_id``."""
    error_id = secrets.token_hex(6)
    log.error(
        "torchpool worker %d: model error %s:\n%s",
        os.getpid(),
        error_id,
        "".join(traceback.format_exception(exc)).rstrip(),
    )
    return ModelFailure(describe(exc), error_id=error_id)


def describe(exc: BaseException) -> str:
    """``Type: message`` with no traceback and no server path in it."""
    message = str(exc).strip()
    if _TRACEBACK.search(message):
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        message = last if _STATED.match(last) else f"{type(exc).__name__}: {last}"
    else:
        message = f"{type(exc).__name__}: {message}"
    message = _PATH.sub(lambda m: ".../" + m.group(0).rstrip("/").rsplit("/", 1)[-1], message)
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE] + "..."
    return message
