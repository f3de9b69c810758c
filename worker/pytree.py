"""Pytrees of tensors: a tensor, or dicts / tuples / lists of pytrees.

What a handler's ``preprocess`` returns and its ``predict`` takes. These few
helpers walk one without torch's private ``torch.utils._pytree``.

Beside tensors, a tree may hold *static* leaves: strings, bytes, numbers,
booleans and None that describe the input rather than carry rows of it
(sentence-transformers 6 puts ``"modality": "text"`` in its tokenizer's dict).
They have no batch dimension: requests batch together only when their static
leaves are equal, and the batch carries them through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch

# ("leaf",) | ("dict", ((key, spec), ...)) | ("tuple" | "list", (spec, ...))
Spec = tuple[Any, ...]

STATIC_TYPES = (str, bytes, int, float, bool, type(None))


def is_static(leaf: Any) -> bool:
    """Whether ``leaf`` is a plain value carried beside the tensors (see the module doc)."""
    return isinstance(leaf, STATIC_TYPES)


def tensors(tree: Any) -> list[torch.Tensor]:
    """The tensor leaves, in :func:`leaves` order."""
    return [leaf for leaf in leaves(tree) if isinstance(leaf, torch.Tensor)]


def statics(tree: Any) -> tuple[Hashable, ...]:
    """The static leaves, in :func:`leaves` order: equal for inputs that may batch together."""
    return tuple(leaf for leaf in leaves(tree) if is_static(leaf))


def leaves(tree: Any) -> list[Any]:
    """Every leaf, depth first, dict keys in sorted order (the order :func:`spec` uses)."""
    if isinstance(tree, Mapping):
        return [leaf for key in _keys(tree) for leaf in leaves(tree[key])]
    if isinstance(tree, list | tuple):
        return [leaf for item in tree for leaf in leaves(item)]
    return [tree]


def spec(tree: Any) -> Spec:
    """The shape of the containers, with leaves left out: equal for equal structures."""
    if isinstance(tree, Mapping):
        return ("dict", tuple((key, spec(tree[key])) for key in _keys(tree)))
    if isinstance(tree, list | tuple):
        return (type(tree).__name__, tuple(spec(item) for item in tree))
    return ("leaf",)


def map_leaves(fn: Callable[[Any], Any], tree: Any) -> Any:
    """The same structure with ``fn`` applied to every leaf."""
    if isinstance(tree, Mapping):
        return {key: map_leaves(fn, value) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(map_leaves(fn, item) for item in tree)
    return fn(tree)


def combine(
    fn: Callable[[list[Any], tuple[Hashable, ...]], Any],
    trees: Sequence[Any],
    path: tuple[Hashable, ...] = (),
) -> Any:
    """Trees of one structure -> one tree whose leaves are ``fn(leaves at a path, path)``."""
    first = trees[0]
    if isinstance(first, Mapping):
        return {key: combine(fn, [t[key] for t in trees], (*path, key)) for key in first}
    if isinstance(first, list | tuple):
        return type(first)(
            combine(fn, [t[i] for t in trees], (*path, i)) for i in range(len(first))
        )
    return fn(list(trees), path)


def to_device(tree: Any, device: torch.device) -> Any:
    """Every tensor leaf moved to ``device`` (left alone when already there)."""
    return map_leaves(
        lambda leaf: (
            leaf.to(device) if isinstance(leaf, torch.Tensor) and leaf.device != device else leaf
        ),
        tree,
    )


def _keys(tree: Mapping[Any, Any]) -> list[Any]:
    return sorted(tree, key=str)
