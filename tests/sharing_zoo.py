"""Handlers for the shared-weights tests, importable by worker processes.

``Bumper`` writes to its own weight on every call: with the weights mapped
copy-on-write, only that worker's answers may move.
"""

from __future__ import annotations

import os

import torch
from torch import nn

ROW = 16
SEED = 3


def seeded_linear() -> nn.Linear:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return nn.Linear(ROW, 4)


class LinearHandler:
    """A handler that holds an nn.Module: its weights are shared like a model file's."""

    input_shape = (ROW,)
    input_dtype = "float32"

    def load(self, device: torch.device) -> None:
        self.model = seeded_linear().to(device).eval()

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(batch)
        return out


class Bumper(LinearHandler):
    """Adds 1 to its weight, then answers [the weight's sum, this process's pid] per row."""

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.model.weight.add_(1.0)
        total = float(self.model.weight.double().sum())
        return torch.tensor([[total, float(os.getpid())]] * len(batch), dtype=torch.float64)


class MappedHandler(LinearHandler):
    """Loads its weights with ``torch.load(mmap=True)``: they map its file already."""

    def __init__(self, weights: str) -> None:
        self.weights = weights

    def load(self, device: torch.device) -> None:
        with torch.device("meta"):
            model = nn.Linear(ROW, 4)
        state = torch.load(self.weights, mmap=True, weights_only=True)
        model.load_state_dict(state, assign=True)
        self.model = model.eval()
