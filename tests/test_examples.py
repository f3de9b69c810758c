"""Logic tier: the worked examples' handlers in-process (preprocess -> predict -> postprocess).

No weights are downloaded: the encoder is a seeded ``BertConfig`` model with a
tokenizer from a vocabulary file written here, the CNN a seeded ResNet-18, and the
images are drawn with Pillow. Each handler's answer is checked against the same
model driven directly (not through the handler), and batched answers against
one-by-one answers, with the padding the worker's batching contract describes.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from PIL import Image

from examples import demo_models
from examples.image_classifier import MEAN, STD, ImageClassifier
from examples.resnet import ResNet18
from examples.text_embedding import TextEmbedder

os.environ["HF_HUB_OFFLINE"] = "1"  # a test that tried to download would fail, not hang

CPU = torch.device("cpu")
WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "in", "park", "quick", "brown"]
SENTENCES = [
    "The cat sat.",
    "A quick brown dog ran in the park on the mat.",
    "Dog.",
    "The cat sat on the mat in the park.",
]


def build_text_model(folder: Path) -> Path:
    """A 2-layer BERT (hidden 32) with seeded weights and its tokenizer, save_pretrained."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *WORDS]
    vocab += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(folder / "vocab.txt"))
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_image_model(path: Path, num_classes: int = 10) -> Path:
    torch.manual_seed(0)
    torch.save(ResNet18(num_classes).state_dict(), path)
    return path


def image_bytes(size: tuple[int, int], fmt: str, mode: str = "RGB", seed: int = 0) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    channels = len(mode)
    pixels = torch.randint(0, 256, (size[1], size[0], channels), generator=generator)
    image = Image.frombytes(mode, size, bytes(pixels.to(torch.uint8).flatten().tolist()))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def pad_and_concat(items: list[dict[str, torch.Tensor]], pad: dict[str, int]) -> Any:
    """What the worker does with dict pytrees (HANDLER_API.md): right-pad each leaf's
    last dimension to the longest in the batch with its pad value, concatenate rows."""
    out = {}
    for key in items[0]:
        longest = max(item[key].shape[-1] for item in items)
        out[key] = torch.cat(
            [
                torch.nn.functional.pad(
                    item[key], (0, longest - item[key].shape[-1]), value=pad.get(key, 0)
                )
                for item in items
            ]
        )
    return out


# --- text ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_text_model(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def embedder(text_dir: Path) -> TextEmbedder:
    handler = TextEmbedder(model_dir=str(text_dir))
    handler.load(CPU)
    return handler


def reference_embedding(text_dir: Path, sentence: str) -> torch.Tensor:
    """The encoder run directly on one sentence: mean of all its hidden states, unit length."""
    from transformers import BertModel, BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(text_dir)
    model = BertModel.from_pretrained(text_dir).eval()
    ids = tokenizer(sentence, return_tensors="pt")
    assert tokenizer.unk_token_id not in ids["input_ids"][0].tolist(), "vocabulary not loaded"
    with torch.inference_mode():
        hidden: torch.Tensor = model(**ids).last_hidden_state[0]
    mean = hidden.mean(dim=0, keepdim=True)
    unit: torch.Tensor = mean / mean.norm()
    return unit


def test_text_preprocess_keeps_each_request_at_its_own_length(embedder: TextEmbedder) -> None:
    short = embedder.preprocess(b"Dog.", "text/plain")
    long = embedder.preprocess(SENTENCES[1].encode(), "text/plain")
    assert set(short) == {"input_ids", "attention_mask", "token_type_ids"}
    assert short["input_ids"].shape == (1, 4)  # [CLS] dog . [SEP]: no padding to a fixed size
    assert long["input_ids"].shape == (1, 14)
    assert all(t.dtype == torch.int64 for t in (*short.values(), *long.values()))
    assert embedder.pad_values["input_ids"] == embedder.tokenizer.pad_token_id == 0


def test_text_json_string_and_list_payloads(embedder: TextEmbedder) -> None:
    one = embedder.preprocess("The cat sat.", "application/json")
    assert one["input_ids"].shape[0] == 1
    two = embedder.preprocess(["Dog.", "The cat sat on the mat."], "application/json")
    assert two["input_ids"].shape == (2, 9)
    assert two["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("payload", [[1.0, 2.0], [], {"text": "x"}, b"\xff\xfe"])
def test_text_rejects_what_is_not_text(embedder: TextEmbedder, payload: Any) -> None:
    with pytest.raises(ValueError, match=r"sentence|UTF-8"):
        embedder.preprocess(payload, "text/plain")


def test_text_embedding_matches_the_encoder_run_directly(
    embedder: TextEmbedder, text_dir: Path
) -> None:
    for sentence in SENTENCES[:2]:
        with torch.inference_mode():
            got = embedder.predict(embedder.preprocess(sentence.encode(), "text/plain"))
        want = reference_embedding(text_dir, sentence)
        assert got.shape == (1, 32)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_text_padded_batch_equals_one_by_one(embedder: TextEmbedder) -> None:
    items = [embedder.preprocess(s.encode(), "text/plain") for s in SENTENCES]
    assert len({item["input_ids"].shape[1] for item in items}) > 1  # lengths really differ
    batch = pad_and_concat(items, embedder.pad_values)
    with torch.inference_mode():
        batched = embedder.predict(batch)
        alone = torch.cat([embedder.predict(item) for item in items])
    assert batched.shape == (len(SENTENCES), 32)
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)
    # Different sentences give different vectors (the pooling does not wash them out).
    assert (batched[0] - batched[1]).abs().max() > 1e-3


# --- images -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_image_model(tmp_path_factory.mktemp("resnet") / "resnet18.pt")


@pytest.fixture(scope="module")
def classifier(weights: Path) -> ImageClassifier:
    labels = [f"class-{i}" for i in range(10)]
    handler = ImageClassifier(
        weights=str(weights), labels=labels, num_classes=10, top_k=3, resize=72, image_size=64
    )
    handler.load(CPU)
    return handler


def test_resnet18_is_torchvision_shaped() -> None:
    model = ResNet18()
    assert sum(p.numel() for p in model.parameters()) == 11_689_512  # torchvision's resnet18
    keys = set(model.state_dict())
    for key in ("conv1.weight", "bn1.running_mean", "layer2.0.downsample.0.weight", "fc.bias"):
        assert key in keys
    assert len(keys) == 122
    with torch.inference_mode():
        assert model.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, 1000)


def test_image_preprocess_normalises_like_imagenet(weights: Path) -> None:
    handler = ImageClassifier(weights=str(weights), num_classes=10, resize=64, image_size=64)
    data = image_bytes((64, 64), "PNG")
    got = handler.preprocess(data, "image/png")
    # At the target size, resize and crop change nothing: the row is the pixels, normalised.
    pixels = torch.tensor(numpy.array(Image.open(io.BytesIO(data))), dtype=torch.float32)
    want = (pixels.permute(2, 0, 1) / 255 - torch.tensor(MEAN).view(3, 1, 1)) / (
        torch.tensor(STD).view(3, 1, 1)
    )
    assert got.shape == (1, 3, 64, 64) and got.dtype == torch.float32
    torch.testing.assert_close(got[0], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("size", "fmt", "mode"),
    [((200, 90), "JPEG", "RGB"), ((50, 120), "PNG", "RGBA"), ((80, 80), "PNG", "L")],
)
def test_image_any_size_and_mode_becomes_one_row(
    classifier: ImageClassifier, size: tuple[int, int], fmt: str, mode: str
) -> None:
    row = classifier.preprocess(image_bytes(size, fmt, mode), f"image/{fmt.lower()}")
    assert row.shape == (1, 3, 64, 64)


def test_image_crop_keeps_the_centre(classifier: ImageClassifier) -> None:
    """A wide image with a white centre and black sides: the crop sees only white."""
    image = Image.new("RGB", (300, 72), "black")
    image.paste((255, 255, 255), (118, 0, 182, 72))  # the centre 64 columns
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    row = classifier.preprocess(buffer.getvalue(), "image/png")
    white = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(row[0, :, :, 2:-2].amin(dim=(1, 2)), white, rtol=0, atol=0.05)


def test_image_answer_matches_the_network_run_directly(
    classifier: ImageClassifier, weights: Path
) -> None:
    model = ResNet18(10)
    model.load_state_dict(torch.load(weights, weights_only=True))
    rows = [
        classifier.preprocess(image_bytes((96, 80), "JPEG", seed=s), "image/jpeg") for s in (1, 2)
    ]
    with torch.inference_mode():
        batched = classifier.predict(torch.cat(rows))
        alone = torch.cat([classifier.predict(row) for row in rows])
        want = torch.softmax(model.eval()(torch.cat(rows)), dim=1)
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(batched, want, rtol=0, atol=1e-5)
    answer = classifier.postprocess(batched[:1])
    top = want[0].topk(3)
    assert [entry["index"] for entry in answer[0]] == top.indices.tolist()
    assert [entry["label"] for entry in answer[0]] == [f"class-{i}" for i in top.indices.tolist()]
    assert [entry["score"] for entry in answer[0]] == pytest.approx(top.values.tolist(), abs=1e-6)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"not an image at all", "not an image"),
        (image_bytes((64, 64), "JPEG")[:-600], "damaged"),
        ([[1.0, 2.0]], "send the image itself"),
    ],
)
def test_image_rejects_what_is_not_an_image(
    classifier: ImageClassifier, payload: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        classifier.preprocess(payload, "image/jpeg")


def test_image_refuses_a_decompression_bomb(classifier: ImageClassifier) -> None:
    buffer = io.BytesIO()
    Image.new("1", (8000, 6000)).save(buffer, format="PNG")  # 48 Mpx in a few kB
    assert len(buffer.getvalue()) < 100_000
    with pytest.raises(ValueError, match="at most"):
        classifier.preprocess(buffer.getvalue(), "image/png")


# --- the demo models ------------------------------------------------------------------


def test_demo_vocabulary_tokenizes_demo_sentences_without_unknowns(tmp_path: Path) -> None:
    from transformers import BertTokenizerFast

    vocab = demo_models.vocabulary(400)
    assert len(vocab) == len(set(vocab)) == 400
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(tmp_path / "vocab.txt"))
    for sentence in demo_models.sentences(20):
        assert tokenizer.unk_token_id not in tokenizer(sentence)["input_ids"], sentence
    assert demo_models.sentences(3) == demo_models.sentences(3)  # seeded


def test_demo_photo_is_a_realistic_jpeg() -> None:
    data = demo_models.photo(640, 480)
    assert 20_000 < len(data) < 200_000
    assert Image.open(io.BytesIO(data)).size == (640, 480)
