"""Real tier: a handler written as a sentence-transformers 6 user writes it, served.

sentence-transformers 6's tokenizer dict carries ``"modality": "text"`` beside
its tensors; ``examples/sentence_embedding.py`` returns that dict from
``preprocess`` and runs ``model(dict(batch))``. Served by `torchpool serve`,
requests of different lengths must batch together (right-padded) and each
answer must equal the library's own ``encode`` of that sentence alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from tests.conftest import Server, wait_for
from tests.test_examples import SENTENCES, build_text_model
from tests.test_examples_serve import assert_rows_close, batch_counts, start

sentence_transformers = pytest.importorskip("sentence_transformers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_text_model(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Server]:
    server = start(
        [
            "--handler", "examples.sentence_embedding:SentenceEmbedder",
            "--model-kwargs", json.dumps({"model": str(model_dir)}),
            "--workers", "1", "--max-batch-size", "8", "--max-batch-delay-ms", "200",
        ],
        tmp_path_factory.mktemp("st") / "serve.log",
    )  # fmt: skip
    yield server
    server.stop()


def encode_alone(model_dir: Path, sentences: list[str]) -> list[list[float]]:
    model = sentence_transformers.SentenceTransformer(str(model_dir), device="cpu")
    with torch.inference_mode():
        rows = [model.encode([s], convert_to_tensor=True, normalize_embeddings=True)[0]
                for s in sentences]  # fmt: skip
    return [row.tolist() for row in rows]


def test_the_tokenizer_dict_carries_a_string_beside_its_tensors(model_dir: Path) -> None:
    """What makes this handler different: sentence-transformers 6 adds a static leaf."""
    model = sentence_transformers.SentenceTransformer(str(model_dir), device="cpu")
    features = dict(model.preprocess(["a cat"]))
    assert features["modality"] == "text"
    assert isinstance(features["input_ids"], torch.Tensor)


def test_sentences_of_different_lengths_batch_and_match_the_library(
    server: Server, model_dir: Path
) -> None:
    sentences = [SENTENCES[i % len(SENTENCES)] + " The cat." * (i % 3) for i in range(8)]
    want = encode_alone(model_dir, sentences)
    forwards0, rows0 = batch_counts(server)

    def one(sentence: str) -> httpx.Response:
        return server.client.post(
            "/predict", content=sentence.encode(), headers={"content-type": "text/plain"}
        )

    with ThreadPoolExecutor(len(sentences)) as pool:
        responses = list(pool.map(one, sentences))
    for response, row in zip(responses, want, strict=True):
        assert response.status_code == 200, response.text
        got = response.json()["prediction"]
        assert_rows_close(got, [row])
        assert math.isclose(sum(x * x for x in got[0]), 1.0, rel_tol=1e-5)

    def counted() -> tuple[float, float] | None:
        forwards, rows = batch_counts(server)
        return (forwards - forwards0, rows - rows0) if rows - rows0 >= len(sentences) else None

    forwards, rows = wait_for(counted, 30, "the heartbeat that reports the batches")
    assert forwards < rows, f"{rows:g} rows in {forwards:g} forward passes: nothing batched"


def test_a_json_list_is_one_request_of_several_rows(server: Server, model_dir: Path) -> None:
    response = server.predict({"input_tensor": SENTENCES[:3]})
    assert response.status_code == 200, response.text
    assert_rows_close(response.json()["prediction"], encode_alone(model_dir, SENTENCES[:3]))
