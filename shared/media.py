"""HTTP media types and content codings, read the same way by the gateway and the workers.

The gateway picks a body's wire format from its media type and refuses a
Content-Encoding no worker can undo; a worker matches the media type against
a handler's ``accepts`` and inflates the body. Both read them here.
"""

from __future__ import annotations

from typing import Final

from shared.errors import RequestError

# What a body without a Content-Type is taken for (RFC 9110, 8.3).
OCTET_STREAM: Final = "application/octet-stream"

# The Content-Encodings a worker inflates, with zlib's window bits for each
# (31: a gzip header and trailer; 15: a zlib stream, which HTTP calls deflate).
ENCODINGS: Final = {"gzip": 31, "deflate": 15}
IDENTITY: Final = "identity"


def media_type(content_type: str | bytes | None) -> str:
    """``"Text/Plain; charset=utf-8"`` -> ``"text/plain"``; none at all is octet-stream.

    Header bytes are read as latin-1, as they came, whatever they hold.
    """
    if isinstance(content_type, bytes):
        content_type = content_type.decode("latin-1")
    return (content_type or "").partition(";")[0].strip().lower() or OCTET_STREAM


def content_encoding(header: str | None) -> str | None:
    """A Content-Encoding header as the coding a worker undoes; None for identity.

    400 for a coding it cannot undo.
    """
    encoding = (header or IDENTITY).strip().lower()
    if encoding == IDENTITY:
        return None
    if encoding not in ENCODINGS:
        raise RequestError(f"Content-Encoding {encoding!r} is not supported; use gzip or deflate")
    return encoding
