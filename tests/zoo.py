"""Small models for the real-process tests, importable by worker processes.

Workers run with the repository root as their working directory, so
``tests.zoo:TinyMLP`` and ``tests.zoo:ScaleHandler`` resolve there too.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROW = 16


class TinyMLP(nn.Module):
    def __init__(self, inputs: int = ROW, hidden: int = 8, outputs: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


class TwoHeads(nn.Module):
    """Returns a dict of tensors, to check that structures map to JSON objects."""

    def __init__(self) -> None:
        super().__init__()
        self.body = TinyMLP()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.body(x)
        return {"logits": out, "argmax": out.argmax(dim=1)}


class ScaleHandler:
    """A handler: multiplies each row by ``factor`` and sums it."""

    input_shape = (ROW,)
    input_dtype = "float32"

    def __init__(self, factor: float = 2.0) -> None:
        self.factor = factor
        self.device: torch.device | None = None

    def load(self, device: torch.device) -> None:
        self.device = device

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        return (batch * self.factor).sum(dim=1)


def seeded(module: nn.Module, seed: int = 7) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for parameter in module.parameters():
            nn.init.normal_(parameter)
    return module.eval()


def build_all(folder: Path) -> dict[str, Any]:
    """Write one file per model source; returns their paths and reference modules."""
    model = seeded(TinyMLP())
    example = torch.randn(3, ROW)
    torchscript = folder / "scripted.pt"
    torch.jit.trace(model, example).save(str(torchscript))  # type: ignore[no-untyped-call]
    exported = folder / "exported.pt2"
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(
        torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), exported
    )
    weights = folder / "weights.pt"
    torch.save(model.state_dict(), weights)
    pickled = folder / "whole.pt"
    torch.save(model, pickled)
    heads = seeded(TwoHeads())
    head_weights = folder / "heads.pt"
    torch.save(heads.state_dict(), head_weights)
    return {
        "model": model,
        "heads": heads,
        "torchscript": torchscript,
        "exported": exported,
        "weights": weights,
        "pickled": pickled,
        "head_weights": head_weights,
    }


class SlowHandler(ScaleHandler):
    """Sleeps ``sleep_s`` per batch (releasing the GIL, as a long forward pass does)."""

    def __init__(self, factor: float = 1.0, sleep_s: float = 1.0) -> None:
        super().__init__(factor)
        self.sleep_s = sleep_s

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        time.sleep(self.sleep_s)
        return super().predict(batch)


class HangHandler(ScaleHandler):
    """Never returns from a batch that holds a negative number: a forward pass
    stuck in a pure-Python loop, which lets the heartbeat thread run on."""

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        if bool((batch < 0).any()):
            while True:
                pass
        return super().predict(batch)


class PoisonableHandler(ScaleHandler):
    """Refuses to load while the file ``poison`` exists: a model that stops loading."""

    def __init__(self, poison: str, factor: float = 1.0) -> None:
        super().__init__(factor)
        self.poison = Path(poison)

    def load(self, device: torch.device) -> None:
        if self.poison.exists():
            raise RuntimeError(f"poisoned by {self.poison}")
        super().load(device)


class BatchProbe:
    """Echoes each row's first value beside the number of rows in its batch.

    Output row ``i`` is ``[batch[i, 0], len(batch)]``, so a client sees both
    that it got its own rows back (order and split) and how big the forward
    pass was. A row whose first value is ``POISON`` makes the batch raise.
    Rows of any width are accepted (no declared input shape).
    """

    POISON = -999.0

    def __init__(self, sleep_s: float = 0.0) -> None:
        self.sleep_s = sleep_s

    def load(self, device: torch.device) -> None:
        self.device = device

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        if bool((batch[:, 0] == self.POISON).any()):
            raise ValueError("poisoned row in the batch")
        if self.sleep_s:
            time.sleep(self.sleep_s)
        sizes = torch.full((batch.shape[0],), float(batch.shape[0]))
        return torch.stack([batch[:, 0], sizes], dim=1)


class CountHandler(ScaleHandler):
    """Declares int64 rows (token ids, say)."""

    input_dtype = "int64"


class DiesBootingHandler(ScaleHandler):
    """Its process exits with code 1 while it loads: a worker that crashes on boot
    (not a load failure it could report), again and again."""

    def load(self, device: torch.device) -> None:
        os._exit(1)
