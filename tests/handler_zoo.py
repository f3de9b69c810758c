"""Handlers that take what clients send (text, uploads) and return pytrees;
importable by worker processes, for the real-process tests."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import torch


class ByteTokens:
    """A toy text model: each text's bytes are its token ids.

    ``preprocess`` takes a JSON string or list of strings, or a raw
    ``text/plain`` body or upload, and returns ``{"ids", "mask"}`` (int64),
    one row per text, as long as the longest text of the request. ``predict``
    answers each row with its real length, the rows and padded length of the
    batch it ran in (so a test sees variable lengths batched together), and
    the ids as the model saw them. A text "boom" makes preprocess raise.
    """

    accepts = ("text/plain", "application/octet-stream")
    pad_values: ClassVar[dict[str, int]] = {"ids": 0, "mask": 0}

    def __init__(self, sleep_s: float = 0.0) -> None:
        self.sleep_s = sleep_s

    def load(self, device: torch.device) -> None:
        self.device = device

    def preprocess(self, payload: Any, content_type: str) -> dict[str, torch.Tensor]:
        texts = payload.decode() if isinstance(payload, bytes) else payload
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"expected text, got {type(payload).__name__}")
        if "boom" in texts:
            raise ValueError("cannot tokenize 'boom'")
        longest = max(len(t.encode()) for t in texts)
        ids = torch.zeros(len(texts), longest, dtype=torch.int64)
        for row, text in enumerate(texts):
            data = text.encode()
            ids[row, : len(data)] = torch.tensor(list(data))
        return {"ids": ids, "mask": (ids != 0).long()}

    def predict(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.sleep_s:
            time.sleep(self.sleep_s)
        rows, padded = batch["ids"].shape
        return {
            "length": batch["mask"].sum(dim=1),
            "batch": torch.tensor([[rows, padded]]).repeat(rows, 1),
            "ids": batch["ids"],
        }
