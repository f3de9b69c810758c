"""Sentence embeddings from a Hugging Face encoder: tokenizer + encoder + mean pooling.

Serve any BERT-style checkpoint saved with ``save_pretrained`` (a local folder with
``config.json``, the weights and the tokenizer files), for example
sentence-transformers/all-MiniLM-L6-v2 fetched once with ``hf download``::

    torchpool serve --handler examples.text_embedding:TextEmbedder \\
        --model-kwargs '{"model_dir": "minilm"}' --max-batch-size 16 --max-batch-delay-ms 2

    curl --data-binary 'A cat sat on the mat.' -H 'content-type: text/plain' \\
        localhost:8000/predict
    curl -d '{"input_tensor": ["first sentence", "second one"]}' \\
        -H 'content-type: application/json' localhost:8000/predict

The answer is ``{"prediction": [[...384 floats...], ...]}``, one unit-length vector
per sentence. The same model answers the OpenAI API's ``/v1/embeddings`` (it declares
``openai_routes``), so the ``openai`` client works unchanged::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    vectors = client.embeddings.create(model="textembedder", input=["first", "second"])

There ``input`` may also be token ids (a list of them per text), which go to the
encoder as they are.

Why it batches: ``preprocess`` returns the tokenizer's tensors (``input_ids``,
``attention_mask``, ``token_type_ids``) at this request's own length, never padded to
a fixed one. The worker batches requests of different lengths by right-padding every
leaf to the longest in the batch with ``pad_values``; the padded positions have
attention mask 0, so the encoder ignores them and the mean pooling in ``predict``
leaves them out. A sentence gets the same vector alone or in any batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def _token_ids(payload: Any) -> list[list[int]] | None:
    """Token-id lists (``/v1/embeddings`` with ids for input), else None."""
    if not isinstance(payload, list) or not payload:
        return None
    rows = all(isinstance(row, list) and row for row in payload)
    if rows and all(isinstance(i, int) for row in payload for i in row):
        return payload
    return None


def sentences(payload: Any, content_type: str) -> list[str]:
    """The request's sentences: a text body, a JSON string or a JSON list of strings, or
    the UTF-8 elements of a BYTES tensor."""
    if isinstance(payload, bytes):
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"the {content_type} body is not UTF-8: {exc}") from exc
        return [text]
    if isinstance(payload, str):
        return [payload]
    if isinstance(payload, list) and payload:
        if all(isinstance(sentence, bytes) for sentence in payload):
            # A BYTES tensor in binary form (tritonclient's default, over HTTP and gRPC).
            return [sentences(sentence, content_type)[0] for sentence in payload]
        if all(isinstance(sentence, str) for sentence in payload):
            return list(payload)
    raise ValueError(
        "send a sentence as a text/plain body, or JSON "
        '{"input_tensor": "a sentence"} or {"input_tensor": ["one", "or more"]}'
    )


class TextEmbedder:
    """``--model-kwargs '{"model_dir": DIR}'``; optional ``normalize`` (default true),
    ``max_length`` (default: the model's position limit)."""

    accepts: Sequence[str] = ("text/plain",)
    # POST /v1/embeddings serves it too (the worker hands preprocess the list of inputs).
    openai_routes = ("embeddings",)

    def __init__(
        self, model_dir: str, normalize: bool = True, max_length: int | None = None
    ) -> None:
        self.model_dir = Path(model_dir)
        self.normalize = normalize
        self.max_length = max_length
        # Read by the worker after load(), which puts the tokenizer's pad id here; the mask
        # and the segment ids pad with 0 (a padded position is masked out of everything).
        self.pad_values = {"input_ids": 0, "attention_mask": 0, "token_type_ids": 0}

    def load(self, device: torch.device) -> None:
        # Imported here so that importing the module (e.g. to read its docstring) stays cheap.
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModel.from_pretrained(self.model_dir).to(device).eval()
        if self.max_length is None:
            self.max_length = int(self.model.config.max_position_embeddings)
        self.pad_values = {**self.pad_values, "input_ids": int(self.tokenizer.pad_token_id or 0)}

    def preprocess(self, payload: Any, content_type: str) -> dict[str, torch.Tensor]:
        """Token ids of this request's sentences, padded only to its own longest one."""
        ids = _token_ids(payload)
        if ids is not None:
            return self._from_ids(ids)
        encoded = self.tokenizer(
            sentences(payload, content_type),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {key: value for key, value in encoded.items() if isinstance(value, torch.Tensor)}

    def _from_ids(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        """Token ids given as they are, right-padded to the longest with the pad id."""
        vocab = int(self.model.config.vocab_size)
        if any(i >= vocab for row in rows for i in row):
            raise ValueError(f"token ids must be below the vocabulary size {vocab}")
        longest = min(max(len(row) for row in rows), self.max_length or 512)
        ids = torch.full((len(rows), longest), int(self.pad_values["input_ids"]))
        mask = torch.zeros((len(rows), longest), dtype=torch.int64)
        for index, row in enumerate(rows):
            kept = row[:longest]
            ids[index, : len(kept)] = torch.tensor(kept)
            mask[index, : len(kept)] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}

    def predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean of the encoder's last hidden states over the real (unmasked) tokens."""
        hidden: torch.Tensor = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1) if self.normalize else pooled
