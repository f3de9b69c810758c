"""Streaming handlers the stream tests load by import path (``tests.streams:...``)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import torch


class Counter:
    """Yields 0, 1, 2, ... as the request's one row ``[count, interval_s, fail_at]`` says.

    ``count`` outputs, one every ``interval_s``; at output ``fail_at`` (-1: never)
    it raises. A generate request's ``{"parameters": {"start": k}}`` counts from
    ``k`` instead. ``marker`` names a file the generator's ``finally`` appends
    ``closed after N`` to, so a test sees when a stream was closed.
    """

    input_shape = (3,)
    input_dtype = "float32"

    def __init__(self, marker: str = "") -> None:
        self.marker = marker

    def load(self, device: torch.device) -> None:
        self.device = device

    def predict_stream(self, x: torch.Tensor, parameters: dict[str, Any]) -> Iterator[torch.Tensor]:
        count, interval_s, fail_at = (float(v) for v in x[0])
        start = int(parameters.get("start", 0))
        made = 0
        try:
            for i in range(int(count)):
                if i == int(fail_at):
                    raise ValueError(f"failed at output {i}")
                if interval_s:
                    time.sleep(interval_s)
                yield torch.tensor(start + i)
                made += 1
        finally:
            if self.marker:
                with Path(self.marker).open("a") as file:
                    file.write(f"closed after {made}\n")

    def postprocess(self, output: torch.Tensor) -> int:
        return int(output)


class AsyncCounter(Counter):
    """The same outputs from an ``async def`` generator (no failures, no pauses)."""

    async def predict_stream(self, x: torch.Tensor) -> AsyncIterator[torch.Tensor]:  # type: ignore[override]
        for i in range(int(x[0, 0])):
            yield torch.tensor(i)


class Flood:
    """Yields ``count`` outputs ``{"i": i, "pad": "x" * size}`` as fast as it can.

    The request's one row is ``[count, size]``. ``marker`` names a file the
    generator appends one byte to per output made, so a test reads how far it
    got from the file's size.
    """

    input_shape = (2,)
    input_dtype = "float32"

    def __init__(self, marker: str) -> None:
        self.marker = Path(marker)

    def load(self, device: torch.device) -> None:
        self.device = device

    def predict_stream(self, x: torch.Tensor) -> Iterator[dict[str, object]]:
        count, size = (int(v) for v in x[0])
        pad = "x" * size
        with self.marker.open("ab", buffering=0) as made:
            for i in range(count):
                made.write(b".")
                yield {"i": i, "pad": pad}


class Fractions:
    """Yields the request's rows divided by 3, one row at a time, in several dtypes.

    Float32 values such as 1/3 print differently as float32 (``0.33333334``) and
    as the float64 they widen to (``0.3333333432674408``): every route must
    print the first.
    """

    input_shape = (2,)
    input_dtype = "float32"

    def load(self, device: torch.device) -> None:
        self.device = device

    def predict_stream(self, x: torch.Tensor) -> Iterator[dict[str, torch.Tensor]]:
        for row in x / 3:
            yield {
                "float32": row,
                "float16": row.half(),
                "bfloat16": row.bfloat16(),
                "scalar": row[0],
            }
