"""A handler for the Open Inference Protocol tests, importable by worker processes."""

from __future__ import annotations

import time
from typing import Any

import torch


class RowCounter:
    """Rows of 4 numbers -> a dict of two outputs: each row's sum, and the batch's row count.

    ``rows`` shows how many rows ran in the forward pass that answered, so a test
    can see requests batched together. ``preprocess`` also takes BYTES (nested
    lists of strings), which count as their lengths.
    """

    input_shape = (4,)
    input_dtype = "float32"

    def __init__(self, sleep_s: float = 0.0) -> None:
        self.sleep_s = sleep_s

    def load(self, device: torch.device) -> None:
        self.device = device

    def preprocess(self, payload: Any) -> torch.Tensor:
        if isinstance(payload, torch.Tensor):
            return payload
        return torch.tensor(
            [
                [float(len(x)) if isinstance(x, str | bytes) else float(x) for x in row]
                for row in payload
            ]
        )

    def predict(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        # Stands in for a long forward pass, so that requests pile up behind it.
        time.sleep(self.sleep_s)
        rows = batch.shape[0]
        return {
            "total": batch.sum(dim=1, keepdim=True),
            "rows": torch.full((rows, 1), rows, dtype=torch.int64),
        }
