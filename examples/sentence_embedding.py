"""Sentence embeddings from any sentence-transformers model, as its own library runs it.

The handler is what a user of sentence-transformers 6 writes first:
``preprocess`` returns ``dict(model.preprocess(texts))`` and ``predict`` runs
``model(dict(batch))``. That dict holds the tokenizer's tensors and, since
sentence-transformers 6, a string beside them (``"modality": "text"``).
torchpool batches such requests as it batches plain tensors: the strings are
static leaves, requests batch together when theirs are equal, and ``predict``
gets them as they are (see :mod:`worker.pytree`)::

    torchpool serve --handler examples.sentence_embedding:SentenceEmbedder \\
        --model-kwargs '{"model": "all-MiniLM-L6-v2"}' --max-batch-size 16

    curl --data-binary 'A cat sat on the mat.' -H 'content-type: text/plain' \\
        http://127.0.0.1:8000/predict

``model`` is a name the library can fetch or a local folder (a saved model, or a
Hugging Face encoder folder, which sentence-transformers wraps in mean pooling).
The answer is one vector per sentence, unit length unless ``normalize`` is false.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from examples.text_embedding import sentences


class SentenceEmbedder:
    """``--model-kwargs '{"model": NAME_OR_DIR}'``; optional ``normalize`` (default true)."""

    accepts: Sequence[str] = ("text/plain",)

    def __init__(self, model: str, normalize: bool = True) -> None:
        self.model_name = model
        self.normalize = normalize
        # Right-padding a batch: the pad token for ids, 0 for the mask and segment ids,
        # so padded positions are masked out of the encoder and of mean pooling.
        self.pad_values = {"input_ids": 0, "attention_mask": 0, "token_type_ids": 0}

    def load(self, device: torch.device) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(self.model_name, device=str(device)).eval()
        pad_id = getattr(self.model.tokenizer, "pad_token_id", None)
        self.pad_values = {**self.pad_values, "input_ids": int(pad_id or 0)}

    def preprocess(self, payload: Any, content_type: str) -> dict[str, Any]:
        return dict(self.model.preprocess(sentences(payload, content_type)))

    def predict(self, batch: dict[str, Any]) -> torch.Tensor:
        embeddings: torch.Tensor = self.model(dict(batch))["sentence_embedding"]
        return F.normalize(embeddings, p=2, dim=1) if self.normalize else embeddings
