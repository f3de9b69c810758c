"""A chat handler the OpenAI tests load by import path (``tests.openai_models:Talker``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


class Talker:
    """A chat handler without a tokenizer, so its ``preprocess`` gets the messages themselves.

    It echoes the last message's words one per output (``"word "``), then says
    ``"more "`` until ``max_tokens`` outputs, or forever, one every ``interval_s``.
    ``marker`` names a file its generator's ``finally`` appends ``closed after N``
    to, so a test sees when the worker closed it.
    """

    openai_routes = ("chat", "completions")
    openai_parameters = ("max_tokens", "seed")  # no temperature, no top_p: those are 400s

    def __init__(self, marker: str = "", interval_s: float = 0.0) -> None:
        self.marker = marker
        self.interval_s = interval_s

    def load(self, device: torch.device) -> None:
        self.device = device

    def preprocess(self, payload: Any) -> torch.Tensor:
        """Messages (chat) or a prompt (completions) -> the last text's characters, one row."""
        if isinstance(payload, list):
            payload = payload[-1]["content"]
        if not isinstance(payload, str) or not payload:
            raise ValueError("send some text")
        return torch.tensor([[ord(char) for char in payload]])

    def predict_stream(self, codes: torch.Tensor, parameters: dict[str, Any]) -> Iterator[str]:
        words = "".join(chr(int(code)) for code in codes[0]).split()
        limit = parameters.get("max_tokens")
        made = 0
        try:
            while limit is None or made < limit:
                yield (words[made] if made < len(words) else "more") + " "
                made += 1
                if self.interval_s:
                    time.sleep(self.interval_s)
        finally:
            if self.marker:
                with Path(self.marker).open("a") as file:
                    file.write(f"closed after {made}\n")
