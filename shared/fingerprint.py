"""A model's settings fingerprint: what must match for two workers to give the same answers.

The digest covers the model file's bytes and the settings that change what a
worker computes (how the model is built and what input it takes), not those
that only change how it runs (device, batching, heartbeats). The gateway
shows each model's fingerprint in /health and compares it with what a remote
worker reports, so a worker started with another file or other flags is
refused instead of serving different answers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from shared.config import ModelSettings

# Settings that change the answers; the file's bytes are the rest.
ANSWER_FIELDS = (
    "model_class",
    "model_kwargs",
    "handler",
    "trust_pickle",
    "input_shape",
    "input_dtype",
)
CHUNK = 1 << 20


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(settings: ModelSettings) -> str:
    """16 hex digits; equal for equal files and answer-changing settings."""
    digest = hashlib.sha256()
    if settings.model:
        digest.update(file_digest(settings.model).encode())
    fields = {name: getattr(settings, name) for name in ANSWER_FIELDS}
    digest.update(json.dumps(fields, sort_keys=True, default=list).encode())
    return digest.hexdigest()[:16]
