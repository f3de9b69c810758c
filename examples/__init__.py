"""Worked handlers for real model kinds, served with ``torchpool serve --handler``.

- ``examples.text_embedding:TextEmbedder``: sentence embeddings from a Hugging Face
  ``transformers`` encoder (tokenizer + encoder, mean pooling); variable-length
  requests batch together, padded by the worker.
- ``examples.image_classifier:ImageClassifier``: JPEG/PNG bytes in (a raw body or a
  multipart upload), top-k classes out, from a ResNet-18 (``examples.resnet``).
- ``examples.demo_models``: writes models with random weights for both, so the
  examples run without downloading anything (tests and the benchmark use it).

Run ``torchpool serve`` from the repository root (or put it on ``PYTHONPATH``) so the
workers can import ``examples``.
"""
