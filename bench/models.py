"""The two benchmark models, built from fixed seeds so every server holds the same weights.

Workers import these classes as ``bench.models:Small`` / ``bench.models:Heavy``
(they run with the repository root as their working directory).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final

import torch
from torch import nn

SEED: Final = 1234


class Small(nn.Module):
    """MLP 16 -> 32 -> 4: the shape of torchpool's built-in demo model."""

    inputs: Final = 16

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


class Heavy(nn.Module):
    """MLP 512 -> 3072 -> 3072 -> 10: a few ms per single-row forward on one core."""

    inputs: Final = 512

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(512, 3072),
            nn.ReLU(),
            nn.Linear(3072, 3072),
            nn.ReLU(),
            nn.Linear(3072, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


class Big(nn.Module):
    """MLP 512 -> 4096 -> (4096 x 6) -> 10: 103 M float32 weights, 411 MB (shared weights)."""

    inputs: Final = 512

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(512, 4096), nn.ReLU()]
        for _ in range(6):
            layers += [nn.Linear(4096, 4096), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(4096, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


MODELS: Final[dict[str, type[Small] | type[Heavy] | type[Big]]] = {
    "small": Small,
    "heavy": Heavy,
    "big": Big,
}
# A weights file named NAME.ts.pt is a TorchScript archive of the model (bench.sharedweights).
TORCHSCRIPT_SUFFIX: Final = ".ts.pt"


def build(name: str, seed: int = SEED) -> nn.Module:
    """The model ``name`` with weights drawn from ``seed``, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MODELS[name]()
    return model.eval()


def load(name: str, weights: Path) -> nn.Module:
    """The model ``name`` with the state_dict saved at ``weights`` (how the peers load it),
    or the TorchScript archive there when its name ends in ``.ts.pt``."""
    if weights.name.endswith(TORCHSCRIPT_SUFFIX):
        script: nn.Module = torch.jit.load(str(weights))  # type: ignore[no-untyped-call]
        return script.eval()
    model = MODELS[name]()
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


def save(name: str, folder: Path) -> Path:
    """Write the state_dict of ``build(name)`` to ``folder/name.pt``; returns the path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.pt"
    torch.save(build(name).state_dict(), path)
    return path


def example_row(name: str, seed: int = 99) -> list[list[float]]:
    """One fixed input row (batch of one) for ``name``, as nested lists."""
    generator = torch.Generator().manual_seed(seed)
    row = torch.rand(1, MODELS[name].inputs, generator=generator) * 2 - 1
    rows: list[list[float]] = row.tolist()
    return rows


def write_body(name: str, folder: Path) -> Path:
    """``folder/body-NAME.json``: the benchmark's request body, one example row as JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"body-{name}.json"
    path.write_text(json.dumps({"input_tensor": example_row(name)}))
    return path
