"""Small models and handlers the worker tests load by import path (``tests.models:...``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class TinyNet(nn.Module):
    """Linear(in_features -> 3), then tanh; deterministic for a given seed."""

    def __init__(self, in_features: int = 8, seed: int = 1) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.fc = nn.Linear(in_features, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


class PairNet(nn.Module):
    """Returns a dict and a tuple, to test splitting structured outputs."""

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        return {"sum": x.sum(dim=1), "parts": (x * 2, x[:, :1])}


class Picky(nn.Module):
    """Raises on any row holding a negative number: the batch culprit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x < 0).any()):
            raise ValueError("negative input")
        return x + 1


class Mean(nn.Module):
    """Reduces the batch: output's first dimension is not the row count."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=0, keepdim=True)


class DoubleHandler:
    """A handler: doubles its input; takes rows of ``width`` numbers."""

    input_dtype = "float32"

    def __init__(self, width: int = 4) -> None:
        self.input_shape = (width,)
        self.device: torch.device | None = None
        self.loaded = False

    def load(self, device: torch.device) -> None:
        self.device = device
        self.loaded = True

    def preprocess(self, payload: Any) -> torch.Tensor:
        return torch.as_tensor(payload, dtype=torch.float32)

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        return batch * 2

    def postprocess(self, output: torch.Tensor) -> dict[str, Any]:
        return {"doubled": output, "rows": int(output.shape[0])}


class BrokenHandler:
    """A handler whose load() fails."""

    def load(self, device: torch.device) -> None:
        raise RuntimeError("weights server unreachable")

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        return batch
