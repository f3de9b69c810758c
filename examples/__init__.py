"""Worked handlers for real model kinds, served with ``torchpool serve --handler``.

- ``examples.text_embedding:TextEmbedder``: sentence embeddings from a Hugging Face
  ``transformers`` encoder (tokenizer + encoder, mean pooling); variable-length
  requests batch together, padded by the worker.
- ``examples.image_classifier:ImageClassifier``: JPEG/PNG bytes in (a raw body or a
  multipart upload), top-k classes out, from a ResNet-18 (``examples.resnet``).
- ``examples.text_generation:TextGenerator``: text generated character by character
  from a small GPT-2-style ``transformers`` model built from a config (random weights),
  streamed as Server-Sent Events (``predict_stream``).
- ``examples.demo_models``: writes models with random weights for both, so the
  examples run without downloading anything (tests and the benchmark use it).

Run ``torchpool serve`` from the repository root (or put it on ``PYTHONPATH``) so the
workers can import ``examples``.
"""
