"""Models with random weights for the examples, so they run without downloading anything.

    python -m examples.demo_models text DIR [--layers 6 --hidden 384]   # a BERT-style encoder
    python -m examples.demo_models image FILE [--classes 1000]         # ResNet-18 weights

The text model is a ``BertModel`` built from a config and saved with
``save_pretrained`` beside a tokenizer whose vocabulary is written here (common
English words, their pieces and single characters), so ``TextEmbedder`` loads it
exactly as it loads a downloaded checkpoint. Weights are drawn from a fixed seed:
the same arguments give the same model. The answers mean nothing; the shapes, the
code path and the cost per request are those of the real thing.
"""

from __future__ import annotations

import argparse
import io
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from examples.resnet import ResNet18

SEED = 1234
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORD_TEXT = (
    "the of and to in is was for on that with as by at from it his an were are which "
    "this be or has had not but first one their its new after who they have her she two "
    "been other when there all during into school time may years more most only over "
    "some world would where later up such used many can state about national out known "
    "university united then made these team him what people each three however between "
    "american both film war several being year well game part also under since through "
    "while four high like same long became house music before season day "
    "cat dog sat mat model server request batch worker image text sentence sunny morning "
    "quick brown fox jumps lazy river mountain small large green blue red light dark "
    "water fire train station garden window table chair book paper road car night"
)
WORDS = tuple(dict.fromkeys(_WORD_TEXT.split()))  # unique, in order
SUFFIXES = ["ed", "ing", "ly", "er", "est", "ion", "al"]


def vocabulary(size: int) -> list[str]:
    """A WordPiece vocabulary of ``size`` entries (unique words first, fillers after)."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    entries = [*SPECIAL, *letters, *"0123456789.,;:!?'\"()-", *[f"##{c}" for c in letters]]
    entries += [f"##{suffix}" for suffix in SUFFIXES]
    entries += WORDS
    if len(entries) > size:
        raise ValueError(f"a vocabulary needs at least {len(entries)} entries, not {size}")
    entries += [f"[unused{i}]" for i in range(size - len(entries))]
    return entries


def save_text_model(
    folder: Path,
    layers: int = 6,
    hidden: int = 384,
    heads: int = 12,
    intermediate: int | None = None,
    vocab_size: int = 30522,
    max_positions: int = 512,
    seed: int = SEED,
) -> Path:
    """Write a BERT-style encoder and its tokenizer to ``folder``; returns ``folder``.

    The defaults are the shape of all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads).
    """
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(vocabulary(vocab_size)) + "\n")
    # transformers 5 takes the file as ``vocab``; its ``vocab_file`` keyword (the
    # transformers 4 spelling) is ignored without a word, leaving 5 special tokens.
    tokenizer = BertTokenizerFast(vocab=str(vocab_file))
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate or 4 * hidden,
        max_position_embeddings=max_positions,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_image_model(path: Path, num_classes: int = 1000, seed: int = SEED) -> Path:
    """Write a ResNet-18 state_dict drawn from ``seed`` to ``path``; returns ``path``.

    The batch-norm running statistics are set to values a trained network has
    (not the fresh 0/1), so activations keep a sane scale through the 18 layers.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ResNet18(num_classes)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                torch.nn.init.uniform_(module.weight, 0.2, 0.5)
                running_var, running_mean = module.running_var, module.running_mean
                assert running_var is not None and running_mean is not None  # tracked by default
                torch.nn.init.uniform_(running_var, 0.5, 2.0)
                torch.nn.init.normal_(running_mean, 0.0, 0.1)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def sentences(count: int, seed: int = 7, words: tuple[int, int] = (6, 18)) -> list[str]:
    """``count`` made-up sentences of ``words`` words (inclusive range), from a fixed seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        chosen = [rng.choice(WORDS) for _ in range(rng.randint(*words))]
        out.append(" ".join(chosen).capitalize() + ".")
    return out


def photo(width: int, height: int, seed: int = 7, fmt: str = "JPEG") -> bytes:
    """A photo-like image (smooth shapes and a little noise) encoded as ``fmt``."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(24):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randrange(width // 2 + 1), y0 + rng.randrange(height // 2 + 1)
        colour = tuple(rng.randrange(256) for _ in range(3))
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(3))
    noise = Image.effect_noise((width, height), 24).convert("RGB")
    image = Image.blend(image, noise, 0.15)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    kinds = parser.add_subparsers(dest="kind", required=True)
    text = kinds.add_parser("text", help="a BERT-style encoder and tokenizer in a folder")
    text.add_argument("folder", type=Path)
    text.add_argument("--layers", type=int, default=6)
    text.add_argument("--hidden", type=int, default=384)
    text.add_argument("--heads", type=int, default=12)
    image = kinds.add_parser("image", help="a ResNet-18 state_dict")
    image.add_argument("path", type=Path)
    image.add_argument("--classes", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.kind == "text":
        save_text_model(args.folder, layers=args.layers, hidden=args.hidden, heads=args.heads)
        print(f'wrote {args.folder}: --model-kwargs \'{{"model_dir": "{args.folder}"}}\'')
    else:
        save_image_model(args.path, num_classes=args.classes)
        print(f'wrote {args.path}: --model-kwargs \'{{"weights": "{args.path}"}}\'')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
