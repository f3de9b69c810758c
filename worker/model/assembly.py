"""How a handler's requests are combined into one batch and its output cut apart.

Part of the handler contract (a handler's ``pad_values``, ``collate`` and
``split``, see :mod:`worker.model.handler`); the serving loop's batching
(:mod:`worker.serve.batching`) groups requests by :meth:`Assembly.key` and
runs each group through :meth:`Assembly.combine` and :meth:`Assembly.divide`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from worker import pytree

PadValues = float | Mapping[str, float]


@dataclass(frozen=True)
class Assembly:
    """How a handler's requests are combined into a batch and its output cut apart.

    ``pad_values`` None: inputs must match exactly (a plain tensor model, whose
    input padding would change what it computes). A number, or a dict of them
    for the keys of a dict pytree (missing keys: 0), turns padding on.
    ``collate(items) -> batch`` and ``split(output, counts) -> outputs``,
    when given, replace padding/concatenation and the row split.
    """

    pad_values: PadValues | None = None
    collate: Callable[[list[Any]], Any] | None = None
    split: Callable[[Any, list[int]], Sequence[Any]] | None = None

    def key(self, inputs: Any) -> Hashable:
        """Requests with equal keys can be combined into one batch."""
        if self.collate is not None:
            return "collate"
        dims = tuple(
            (leaf.dtype, tuple(leaf.shape[1:-1] if self._padded(leaf) else leaf.shape[1:]))
            for leaf in pytree.tensors(inputs)
        )
        return pytree.spec(inputs), dims, pytree.statics(inputs)

    def length(self, inputs: Any) -> int:
        """The sequence length padding would stretch: the longest last dimension."""
        if self.pad_values is None or self.collate is not None:
            return 0
        leaves = pytree.tensors(inputs)
        return max((leaf.shape[-1] for leaf in leaves if leaf.ndim >= 2), default=0)

    def combine(self, items: Sequence[Any]) -> Any:
        """One batch from compatible inputs (see :meth:`key`)."""
        if self.collate is not None:
            return self.collate(list(items))
        if len(items) == 1:
            return items[0]
        return pytree.combine(self._concat, items)

    def divide(self, output: Any, counts: list[int]) -> list[Any] | None:
        """One output per request, or None when the output cannot be cut."""
        if self.split is None:
            return split_output(output, counts)
        parts = list(self.split(output, counts))
        if len(parts) != len(counts):
            raise ValueError(f"split returned {len(parts)} outputs for {len(counts)} requests")
        return parts

    def _padded(self, leaf: torch.Tensor) -> bool:
        return self.pad_values is not None and leaf.ndim >= 2

    def _pad_value(self, path: tuple[Hashable, ...]) -> float:
        if isinstance(self.pad_values, Mapping):
            key = path[0] if path else None
            return self.pad_values.get(key, 0) if isinstance(key, str) else 0
        return self.pad_values or 0

    def _concat(self, leaves: list[Any], path: tuple[Hashable, ...]) -> Any:
        if not isinstance(leaves[0], torch.Tensor):
            return leaves[0]  # a static leaf, equal in every request of the batch (see key)
        if not self._padded(leaves[0]):
            return torch.cat(leaves)
        longest = max(leaf.shape[-1] for leaf in leaves)
        rows = sum(leaf.shape[0] for leaf in leaves)
        # One allocation filled with the pad value, each request copied in once.
        batch = leaves[0].new_full((rows, *leaves[0].shape[1:-1], longest), self._pad_value(path))
        start = 0
        for leaf in leaves:
            batch[start : start + leaf.shape[0], ..., : leaf.shape[-1]] = leaf
            start += leaf.shape[0]
        return batch


def split_output(output: Any, counts: Sequence[int]) -> list[Any] | None:
    """Cut a batched output into one piece per request, by row count.

    Tensors are split along dim 0; tuples, lists and dicts are split leaf by
    leaf; strings, bytes and None (a label the model passes through, such as
    sentence-transformers' ``"modality"``) go to every request as they are.
    Returns None when the output cannot be cut that way (a tensor whose first
    dimension is not the total row count, or a number or other leaf that may
    have been computed over the whole batch): the caller then runs each
    request alone.
    """
    if isinstance(output, str | bytes) or output is None:
        return [output] * len(counts)
    total = sum(counts)
    if isinstance(output, torch.Tensor):
        if output.ndim == 0 or output.shape[0] != total:
            return None
        return list(torch.split(output, list(counts)))
    if isinstance(output, Mapping):
        columns = {key: split_output(value, counts) for key, value in output.items()}
        if any(parts is None for parts in columns.values()):
            return None
        return [
            {key: parts[i] for key, parts in columns.items() if parts is not None}
            for i in range(len(counts))
        ]
    if isinstance(output, list | tuple):
        items = [split_output(value, counts) for value in output]
        if not items:
            return None
        pieces: list[list[Any]] = []
        for parts in items:
            if parts is None:
                return None
            pieces.append(parts)
        return [type(output)(parts[i] for parts in pieces) for i in range(len(counts))]
    return None
