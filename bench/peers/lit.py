"""LitServe 0.2.19 serving a benchmark model: 2 CPU workers, batching on, fast settings.

    python -m bench.peers.lit --model heavy --weights W.pt --port 8000

Settings (from litserve's own source and docs): ``fast_queue=True`` (ZeroMQ for
the replies), ``max_batch_size=16`` with a small ``batch_timeout`` on the LitAPI,
``workers_per_device=2`` on ``accelerator="cpu"``, the default number of API
servers (one per inference worker), uvloop and httptools, no access log.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import litserve as ls
import torch

from bench.models import load


class BenchAPI(ls.LitAPI):  # type: ignore[misc]
    def __init__(self, model: str, weights: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_name = model
        self.weights = weights
        self.counts: list[int] = []

    def setup(self, device: str) -> None:
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
        self.model = load(self.model_name, self.weights)

    # LitServe reads these two annotations to build its FastAPI endpoint; left out,
    # as in its docs, the request is the parsed JSON body and nothing re-validates
    # the response.
    def decode_request(self, request):  # type: ignore[no-untyped-def]
        return torch.tensor(request["input_tensor"])

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        self.counts = [int(x.shape[0]) for x in inputs]
        return torch.cat(inputs)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out: torch.Tensor = self.model(x)
        return out

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(output, self.counts))

    def encode_response(self, output: torch.Tensor):  # type: ignore[no-untyped-def]
        return {"prediction": output.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-timeout", type=float, default=0.002)
    args = parser.parse_args()
    api = BenchAPI(
        args.model,
        args.weights,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
    )
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=2, fast_queue=True)
    server.run(
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        generate_client_file=False,
        loop="uvloop",
        http="httptools",
        access_log=False,
    )


if __name__ == "__main__":
    main()
