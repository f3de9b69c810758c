"""The classic recipe: load the model at FastAPI startup, run it inline in ``predict``.

Written the way the popular tutorials write it. Which model to serve comes from
the environment (``BENCH_MODEL``: small or heavy; ``BENCH_WEIGHTS``: its
state_dict), so the same app runs under one uvicorn process or ``--workers 2``:

    uvicorn bench.peers.recipe:app --host 127.0.0.1 --port 8000 [--workers 2]
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from pydantic import BaseModel

from bench.models import load

torch.set_num_threads(1)
torch.set_num_interop_threads(1)

state: dict[str, Any] = {}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state["model"] = load(os.environ["BENCH_MODEL"], Path(os.environ["BENCH_WEIGHTS"]))
    yield
    state.clear()


app = FastAPI(lifespan=lifespan)


class PredictRequest(BaseModel):
    input_tensor: list[list[float]]


@app.post("/predict")
async def predict(request: PredictRequest) -> dict[str, Any]:
    with torch.inference_mode():
        output = state["model"](torch.tensor(request.input_tensor))
    return {"prediction": output.tolist()}
