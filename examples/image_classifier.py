"""Image classification: JPEG/PNG bytes in, the top-k classes out, from a ResNet-18.

The image arrives as the request body itself or as a multipart upload::

    torchpool serve --handler examples.image_classifier:ImageClassifier \\
        --model-kwargs '{"weights": "resnet18.pt", "labels": "labels.txt"}' \\
        --max-batch-size 8 --max-batch-delay-ms 2

    curl --data-binary @cat.jpg -H 'content-type: image/jpeg' localhost:8000/predict
    curl -F file=@cat.jpg localhost:8000/predict

and the answer is ``{"prediction": [[{"label": "tabby", "index": 281, "score": 0.62},
...]]}``: one list of the ``top_k`` best classes per image, best first.

``weights`` is a ResNet-18 state_dict; torchvision's ImageNet weights
(``resnet18-f37072fd.pth``) load as they are (see ``examples.resnet``). ``labels`` is
a text file with one class name per line, or a JSON list; without it the labels are
the class indices as strings.

Preprocessing is torchvision's usual ImageNet evaluation transform, written with
Pillow and torch: shorter side resized to ``resize`` (bilinear, antialiased), centre
crop of ``image_size``, scaled to [0, 1], normalised with the ImageNet mean and std.
Every image becomes one (3, image_size, image_size) row, so any requests batch.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from examples.resnet import ResNet18

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Refuse before decoding anything that would expand past this many pixels (a small
# PNG can declare a huge canvas: a decompression bomb).
MAX_PIXELS = 40_000_000


def decode(data: bytes, content_type: str) -> Image.Image:
    """The image in ``data`` as RGB; ValueError (answered with 400) when it is not one."""
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"the {content_type} body is not an image Pillow can read") from exc
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ValueError(f"the image is {width}x{height} pixels; at most {MAX_PIXELS:,} are taken")
    try:
        return image.convert("RGB")
    except OSError as exc:  # truncated or corrupt data shows up only when decoding
        raise ValueError(f"the {content_type} body is a damaged image: {exc}") from exc


def to_tensor(image: Image.Image, resize: int, size: int) -> torch.Tensor:
    """Resize the shorter side to ``resize``, crop the centre ``size`` square, normalise.

    Returns one row: (1, 3, size, size), float32.
    """
    width, height = image.size
    # Sizes and crop offsets rounded as torchvision's Resize and CenterCrop round them.
    if width <= height:
        new_size = (resize, int(resize * height / width))
    else:
        new_size = (int(resize * width / height), resize)
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BILINEAR)
    left = round((new_size[0] - size) / 2.0)
    top = round((new_size[1] - size) / 2.0)
    image = image.crop((left, top, left + size, top + size))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    chw = pixels.view(size, size, 3).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return ((chw - mean) / std).unsqueeze(0)


def _labels(labels: str | Sequence[str] | None, count: int) -> list[str]:
    if labels is None:
        return [str(index) for index in range(count)]
    if isinstance(labels, str):
        names = [line.strip() for line in Path(labels).read_text().splitlines() if line.strip()]
    else:
        names = list(labels)
    if len(names) != count:
        raise ValueError(f"{len(names)} labels given for a model with {count} classes")
    return names


class ImageClassifier:
    """``--model-kwargs '{"weights": PATH}'``; optional ``labels``, ``num_classes``
    (default 1000), ``top_k`` (5), ``resize`` (256), ``image_size`` (224)."""

    accepts: Sequence[str] = ("image/jpeg", "image/png")

    def __init__(
        self,
        weights: str,
        labels: str | list[str] | None = None,
        num_classes: int = 1000,
        top_k: int = 5,
        resize: int = 256,
        image_size: int = 224,
    ) -> None:
        if not 1 <= top_k <= num_classes:
            raise ValueError(f"top_k must be between 1 and num_classes ({num_classes})")
        if resize < image_size:
            raise ValueError(f"resize ({resize}) must be at least image_size ({image_size})")
        self.weights = Path(weights)
        self.labels = _labels(labels, num_classes)
        self.num_classes = num_classes
        self.top_k = top_k
        self.resize = resize
        self.image_size = image_size

    def load(self, device: torch.device) -> None:
        model = ResNet18(self.num_classes)
        model.load_state_dict(torch.load(self.weights, map_location="cpu", weights_only=True))
        self.model = model.to(device).eval()

    def preprocess(self, payload: Any, content_type: str) -> torch.Tensor:
        if not isinstance(payload, bytes):
            raise ValueError(
                "send the image itself: its bytes as the body (content-type image/jpeg or "
                "image/png), or a multipart form with one file"
            )
        return to_tensor(decode(payload, content_type), self.resize, self.image_size)

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities, (rows, num_classes)."""
        return torch.softmax(self.model(batch), dim=1)

    def postprocess(self, probabilities: torch.Tensor) -> list[list[dict[str, Any]]]:
        scores, indices = probabilities.topk(self.top_k, dim=1)
        return [
            [
                {"label": self.labels[index], "index": index, "score": score}
                for score, index in zip(row_scores, row_indices, strict=True)
            ]
            for row_scores, row_indices in zip(scores.tolist(), indices.tolist(), strict=True)
        ]
