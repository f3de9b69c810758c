"""The classic recipe for the real models: load at FastAPI startup, run inline, one process.

Written as the model cards and tutorials write it: the tokenizer and encoder from
``AutoTokenizer``/``AutoModel`` with the mean pooling of the sentence-transformers
model cards, or the image decoded with Pillow and transformed in the endpoint.
torch keeps its default thread count (one per core). The same pre- and
post-processing as the torchpool handlers in ``examples/``, so the answers match:

    BENCH_TEXT_DIR=DIR uvicorn bench.peers.realrecipe:text_app --port 8000
    BENCH_IMAGE_WEIGHTS=W.pt uvicorn bench.peers.realrecipe:image_app --port 8000

Text takes ``{"input_tensor": "a sentence"}``; images take the JPEG/PNG bytes as the
body. Both answer ``{"prediction": ...}`` as torchpool does.
"""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
import torch.nn.functional as F
from fastapi import FastAPI, Request
from PIL import Image
from pydantic import BaseModel

from examples.image_classifier import to_tensor
from examples.resnet import ResNet18

state: dict[str, Any] = {}


@asynccontextmanager
async def text_lifespan(app: FastAPI) -> AsyncIterator[None]:
    from transformers import AutoModel, AutoTokenizer

    state["tokenizer"] = AutoTokenizer.from_pretrained(os.environ["BENCH_TEXT_DIR"])
    state["model"] = AutoModel.from_pretrained(os.environ["BENCH_TEXT_DIR"]).eval()
    yield
    state.clear()


text_app = FastAPI(lifespan=text_lifespan)


class EmbedRequest(BaseModel):
    input_tensor: str


@text_app.post("/predict")
async def embed(request: EmbedRequest) -> dict[str, Any]:
    encoded = state["tokenizer"](
        [request.input_tensor], padding=True, truncation=True, return_tensors="pt"
    )
    with torch.inference_mode():
        hidden = state["model"](**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        embedding = F.normalize(pooled, p=2, dim=1)
    return {"prediction": embedding.tolist()}


@asynccontextmanager
async def image_lifespan(app: FastAPI) -> AsyncIterator[None]:
    model = ResNet18()
    model.load_state_dict(torch.load(os.environ["BENCH_IMAGE_WEIGHTS"], weights_only=True))
    state["model"] = model.eval()
    yield
    state.clear()


image_app = FastAPI(lifespan=image_lifespan)


@image_app.post("/predict")
async def classify(request: Request) -> dict[str, Any]:
    image = Image.open(io.BytesIO(await request.body())).convert("RGB")
    batch = to_tensor(image, 256, 224)
    with torch.inference_mode():
        probabilities = torch.softmax(state["model"](batch), dim=1)
    scores, indices = probabilities.topk(5, dim=1)
    top = [
        {"label": str(index), "index": index, "score": score}
        for score, index in zip(scores[0].tolist(), indices[0].tolist(), strict=True)
    ]
    return {"prediction": [top]}
