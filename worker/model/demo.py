"""The built-in demo model, served when no model is given.

A small MLP built from a fixed seed inside a forked RNG, so every worker (and
a test computing it in-process) holds exactly the same weights without
disturbing anyone else's random state.
"""

from __future__ import annotations

from typing import Final

import torch
from torch import nn

INPUT_SHAPE: Final = (16,)
INPUT_DTYPE: Final = "float32"
SEED: Final = 0


def build_demo_model() -> nn.Module:
    """MLP 16 -> 32 -> 4 (Linear, ReLU, Linear), float32, eval mode, on CPU."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    return model.eval()
