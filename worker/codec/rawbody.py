"""Bodies that are not JSON or msgpack (``fmt == "raw"``): bytes for a handler's ``preprocess``.

The gateway passes any other HTTP body through untouched, with its
Content-Type as the REQUEST's ``ctype`` (see :mod:`shared.protocol`). Here:

- a model without ``preprocess`` takes tensors only: 415;
- ``multipart/form-data`` (``curl -F file=@cat.jpg``) must hold exactly one
  file field; its bytes and its part's content type go on, parsed with
  python-multipart in memory (a body is already bounded by ``--max-body-mb``);
- a handler's ``accepts`` is checked against the media type: 415 naming the
  accepted types when it does not match.

The answer is ``{"prediction": ...}`` JSON, as for a JSON request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from shared import protocol
from shared.errors import RequestError, UnsupportedMediaType
from shared.media import OCTET_STREAM, media_type
from worker.codec.inputs import InputSpec, check_body_size, prepare
from worker.codec.predict import encode_json

MULTIPART: Final = "multipart/form-data"


class RawCodec:
    """``fmt == "raw"``: the body's bytes to ``preprocess``, a JSON answer back."""

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec

    def decode(self, header: Mapping[str, Any], body: bytes | memoryview) -> tuple[Any, None]:
        check_body_size(body, self.spec.max_bytes)
        ctype = str(header.get("ctype") or OCTET_STREAM)
        media = media_type(ctype)
        if self.spec.preprocess is None:
            raise UnsupportedMediaType(
                f"this model takes tensors: send application/json "
                f'({{"input_tensor": [[...]]}}) or application/msgpack, not {media}'
            )
        payload = bytes(body)
        if media == MULTIPART:
            payload, media = single_file(payload, ctype)
        check_accepted(media, self.spec.accepts)
        return prepare(payload, media, self.spec), None

    def encode(self, context: Any, result: Any) -> tuple[bytes, str, dict[str, Any]]:
        return encode_json(result), protocol.FMT_JSON, {}


def check_accepted(media: str, accepts: Sequence[str] | None) -> None:
    """415 when ``media`` matches none of ``accepts`` (``type/*`` and ``*/*`` are wildcards)."""
    if accepts is None:
        return
    kind = media.partition("/")[0]
    for pattern in accepts:
        if pattern in (media, "*/*", f"{kind}/*"):
            return
    raise UnsupportedMediaType(
        f"this model accepts {', '.join(accepts)}; the body is {media}",
        accepts=list(accepts),
    )


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)


def single_file(body: bytes, ctype: str) -> tuple[bytes, str]:
    """The one file field of a ``multipart/form-data`` body: its bytes and media type."""
    _, options = parse_options_header(ctype)
    boundary = options.get(b"boundary")
    if not boundary:
        raise RequestError("the multipart/form-data Content-Type has no boundary")
    parts = _parse(body, boundary)
    files = [part for part in parts if b"filename" in _disposition(part)]
    if len(files) != 1:
        raise RequestError(
            f"a multipart/form-data upload needs exactly one file field "
            f"(curl -F file=@name); this one has {len(files)}"
        )
    part_type = files[0].headers.get(b"content-type", b"").decode("latin-1")
    return bytes(files[0].data), media_type(part_type)


def _parse(body: bytes, boundary: bytes) -> list[_Part]:
    parts: list[_Part] = []
    field_name = bytearray()
    field_value = bytearray()

    def on_part_begin() -> None:
        parts.append(_Part())

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].data += data[start:end]

    def on_header_field(data: bytes, start: int, end: int) -> None:
        field_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        field_value.extend(data[start:end])

    def on_header_end() -> None:
        parts[-1].headers[bytes(field_name).lower()] = bytes(field_value)
        field_name.clear()
        field_value.clear()

    ended = False

    def on_end() -> None:
        nonlocal ended
        ended = True

    callbacks: Any = {
        "on_part_begin": on_part_begin,
        "on_part_data": on_part_data,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_end": on_end,
    }
    parser = MultipartParser(boundary, callbacks)
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise RequestError(f"the multipart/form-data body is malformed: {exc}") from exc
    if not ended:
        raise RequestError("the multipart/form-data body ends before its closing boundary")
    return parts


def _disposition(part: _Part) -> dict[bytes, bytes]:
    _, options = parse_options_header(part.headers.get(b"content-disposition", b""))
    return options
