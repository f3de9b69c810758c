"""Real tier: the worked examples served by `torchpool serve`, driven over HTTP and by curl.

Each answer is checked against the same handler run in-process on the same
weights (the test saved them; the worker loads them from the same files). The
curl lines are the README's, run as they are written.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from examples.demo_models import photo
from examples.image_classifier import ImageClassifier
from examples.text_embedding import TextEmbedder
from tests.conftest import Server, wait_for
from tests.test_examples import SENTENCES, build_image_model, build_text_model, image_bytes

os.environ["HF_HUB_OFFLINE"] = "1"

CPU = torch.device("cpu")
LABELS = [f"class-{i}" for i in range(10)]
IMAGE_KWARGS: dict[str, Any] = {
    "labels": LABELS,
    "num_classes": 10,
    "top_k": 3,
    "resize": 128,
    "image_size": 112,
}
CURL = shutil.which("curl")


def start(args: list[str], log: Path) -> Server:
    server = Server(args, log, env={"HF_HUB_OFFLINE": "1"})
    try:
        server.wait_ready(1)
    except BaseException:
        server.stop()
        raise
    return server


# --- text ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_text_model(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def text_server(tmp_path_factory: pytest.TempPathFactory, text_dir: Path) -> Iterator[Server]:
    server = start(
        [
            "--handler", "examples.text_embedding:TextEmbedder",
            "--model-kwargs", json.dumps({"model_dir": str(text_dir)}),
            "--workers", "1", "--max-batch-size", "8", "--max-batch-delay-ms", "200",
        ],
        tmp_path_factory.mktemp("text") / "serve.log",
    )  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def embedder(text_dir: Path) -> TextEmbedder:
    handler = TextEmbedder(model_dir=str(text_dir))
    handler.load(CPU)
    return handler


def embed(embedder: TextEmbedder, payload: Any, content_type: str) -> list[list[float]]:
    with torch.inference_mode():
        out: list[list[float]] = embedder.predict(
            embedder.preprocess(payload, content_type)
        ).tolist()
    return out


def assert_rows_close(got: Any, want: list[list[float]]) -> None:
    assert isinstance(got, list) and len(got) == len(want)
    for got_row, want_row in zip(got, want, strict=True):
        assert len(got_row) == len(want_row)
        assert max(abs(a - b) for a, b in zip(got_row, want_row, strict=True)) < 1e-5


def batch_counts(server: Server) -> tuple[float, float]:
    """(forward passes, rows) so far, from the ``torchpool_batch_rows`` histogram."""
    text = server.get("/metrics").text
    count = re.search(r"^torchpool_batch_rows_count(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE)
    rows = re.search(r"^torchpool_batch_rows_sum(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE)
    assert count and rows, text[-2000:]
    return float(count.group(1)), float(rows.group(1))


def test_text_plain_body_is_one_sentence(text_server: Server, embedder: TextEmbedder) -> None:
    response = text_server.client.post(
        "/predict", content=SENTENCES[1].encode(), headers={"content-type": "text/plain"}
    )
    assert response.status_code == 200, response.text
    got = response.json()["prediction"]
    assert_rows_close(got, embed(embedder, SENTENCES[1].encode(), "text/plain"))
    assert math.isclose(sum(x * x for x in got[0]), 1.0, rel_tol=1e-5)


def test_text_json_list_of_sentences(text_server: Server, embedder: TextEmbedder) -> None:
    response = text_server.predict({"input_tensor": SENTENCES[:3]})
    assert response.status_code == 200, response.text
    assert_rows_close(response.json()["prediction"], embed(embedder, SENTENCES[:3], "x"))


def test_text_bytes_tensor_from_tritonclient(text_server: Server, embedder: TextEmbedder) -> None:
    """A BYTES tensor in binary form (how tritonclient sends strings, over HTTP and gRPC)."""
    import numpy as np
    import tritonclient.http as triton

    client = triton.InferenceServerClient(text_server.url.removeprefix("http://"))
    try:
        text = triton.InferInput("text", [2], "BYTES")
        text.set_data_from_numpy(np.array([s.encode() for s in SENTENCES[:2]], dtype=np.object_))
        got = client.infer("textembedder", [text]).as_numpy("output__0")
    finally:
        client.close()
    assert_rows_close(got.tolist(), embed(embedder, SENTENCES[:2], "x"))


def test_text_requests_of_different_lengths_batch_together(
    text_server: Server, embedder: TextEmbedder
) -> None:
    sentences = [SENTENCES[i % len(SENTENCES)] + " The cat." * (i % 3) for i in range(8)]
    forwards0, rows0 = batch_counts(text_server)

    def one(sentence: str) -> httpx.Response:
        return text_server.client.post(
            "/predict", content=sentence.encode(), headers={"content-type": "text/plain"}
        )

    with ThreadPoolExecutor(len(sentences)) as pool:
        responses = list(pool.map(one, sentences))
    for sentence, response in zip(sentences, responses, strict=True):
        assert response.status_code == 200, response.text
        assert_rows_close(response.json()["prediction"], embed(embedder, sentence, "x"))

    def counted() -> tuple[float, float] | None:
        forwards, rows = batch_counts(text_server)
        return (forwards - forwards0, rows - rows0) if rows - rows0 >= len(sentences) else None

    forwards, rows = wait_for(counted, 30, "the heartbeat that reports the batches")
    assert forwards < rows, f"{rows:g} rows in {forwards:g} forward passes: nothing batched"


def test_text_refuses_an_image(text_server: Server) -> None:
    response = text_server.client.post(
        "/predict", content=image_bytes((8, 8), "PNG"), headers={"content-type": "image/png"}
    )
    assert response.status_code == 415, response.text
    assert "text/plain" in response.text


# --- images -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_image_model(tmp_path_factory.mktemp("resnet") / "resnet18.pt")


@pytest.fixture(scope="module")
def image_server(tmp_path_factory: pytest.TempPathFactory, weights: Path) -> Iterator[Server]:
    server = start(
        [
            "--handler", "examples.image_classifier:ImageClassifier",
            "--model-kwargs", json.dumps({"weights": str(weights), **IMAGE_KWARGS}),
            "--workers", "1", "--max-batch-size", "4",
        ],
        tmp_path_factory.mktemp("image") / "serve.log",
    )  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def classifier(weights: Path) -> ImageClassifier:
    handler = ImageClassifier(weights=str(weights), **IMAGE_KWARGS)
    handler.load(CPU)
    return handler


def classify(classifier: ImageClassifier, data: bytes, content_type: str) -> Any:
    with torch.inference_mode():
        return classifier.postprocess(classifier.predict(classifier.preprocess(data, content_type)))


def assert_same_classes(got: Any, want: list[list[dict[str, Any]]]) -> None:
    assert isinstance(got, list) and len(got) == len(want) == 1
    assert [entry["label"] for entry in got[0]] == [entry["label"] for entry in want[0]]
    for got_entry, want_entry in zip(got[0], want[0], strict=True):
        assert got_entry["index"] == want_entry["index"]
        assert math.isclose(got_entry["score"], want_entry["score"], abs_tol=1e-5)


def curl(*args: str) -> tuple[int, Any]:
    assert CURL is not None, "curl is needed to check the README's curl lines"
    result = subprocess.run(
        [CURL, "-sS", "-w", "\n%{http_code}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    body, _, status = result.stdout.rpartition("\n")
    return int(status), json.loads(body)


@pytest.mark.parametrize(
    ("name", "form"),
    [("cat.jpg", False), ("cat.jpg", True), ("cat.png", True)],
    ids=["jpeg-body", "jpeg-upload", "png-upload"],
)
def test_curl_lines_of_the_readme(
    image_server: Server, classifier: ImageClassifier, tmp_path: Path, name: str, form: bool
) -> None:
    """The README's lines: `curl --data-binary @cat.jpg -H ...` and `curl -F file=@cat.jpg`."""
    cat = tmp_path / name
    fmt, content_type = ("PNG", "image/png") if name.endswith(".png") else ("JPEG", "image/jpeg")
    cat.write_bytes(photo(320, 240, seed=3, fmt=fmt))
    url = image_server.url + "/predict"
    if form:
        status, answer = curl("-F", f"file=@{cat}", url)
    else:
        status, answer = curl(
            "--data-binary", f"@{cat}", "-H", f"content-type: {content_type}", url
        )
    assert status == 200, answer
    assert_same_classes(answer["prediction"], classify(classifier, cat.read_bytes(), content_type))


def test_image_garbage_is_400_and_text_is_415(image_server: Server) -> None:
    garbage = image_server.client.post(
        "/predict", content=b"GIF89a not really", headers={"content-type": "image/jpeg"}
    )
    assert garbage.status_code == 400, garbage.text
    assert "not an image" in garbage.text
    text = image_server.client.post(
        "/predict", content=b"a cat", headers={"content-type": "text/plain"}
    )
    assert text.status_code == 415, text.text
    assert "image/jpeg" in text.text and "image/png" in text.text
