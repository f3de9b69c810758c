"""Which tensors of a loaded model are shared, and how they are swapped for mapped views.

A model's weights are the parameters and buffers of its *roots*: the module a
file loads to (TorchScript, torch.export, a pickle, a state_dict's class), or
the ``nn.Module`` attributes a handler holds after ``load()`` (a Hugging Face
model, say). Each tensor is named ``<root>.<name>`` so a later worker finds
the same tensor by the same name in its own copy of the structure.

Swapping uses ``tensor.data = view``: the tensor object the module (or a
TorchScript module's C++ side) holds stays the same, only its storage changes,
so tied weights stay tied and nothing that kept a reference is left behind.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.codec.tensors import dtype_name


def handler_roots(handler: object) -> dict[str, nn.Module]:
    """The modules a handler holds: its attributes, and the values of dict/list attributes."""
    roots: dict[str, nn.Module] = {}
    for attr, value in vars(handler).items():
        if isinstance(value, nn.Module):
            roots[attr] = value
        elif isinstance(value, dict):
            roots.update(
                (f"{attr}.{key}", item)
                for key, item in value.items()
                if isinstance(item, nn.Module) and isinstance(key, str)
            )
        elif isinstance(value, (list, tuple)):
            roots.update(
                (f"{attr}.{i}", item) for i, item in enumerate(value) if isinstance(item, nn.Module)
            )
    return roots


def shareable(tensor: torch.Tensor) -> bool:
    """A dense CPU tensor of a dtype the file format names."""
    if tensor.device.type != "cpu" or tensor.layout != torch.strided or tensor.is_quantized:
        return False
    try:
        dtype_name(tensor.dtype)
    except (KeyError, ValueError):
        return False
    return True


def named_tensors(roots: dict[str, nn.Module]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of ``roots``, each tensor object once."""
    seen: set[int] = set()
    for prefix, root in roots.items():
        for name, tensor in [*root.named_parameters(), *root.named_buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                yield f"{prefix}.{name}" if prefix else name, tensor


def collect(roots: dict[str, nn.Module]) -> tuple[dict[str, torch.Tensor], int]:
    """The shareable tensors by name, and the bytes of those that stay private."""
    shared: dict[str, torch.Tensor] = {}
    private = 0
    for name, tensor in named_tensors(roots):
        if shareable(tensor):
            shared[name] = tensor
        else:
            private += tensor.numel() * tensor.element_size()
    return shared, private


def file_backed(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """The tensors whose memory is a mapping of a regular file, by name, and that file.

    Such a tensor (a safetensors file Hugging Face mapped, a state_dict loaded
    with ``mmap=True``) is shared already: every worker maps the same file from
    the page cache. Publishing it again would only hold a second copy in
    shared memory.
    """
    ranges = _file_ranges()
    found: dict[str, str] = {}
    for name, tensor in tensors.items():
        address = tensor.data_ptr()
        for start, end, path in ranges:
            if start <= address < end:
                found[name] = path
                break
    return found


def _file_ranges() -> list[tuple[int, int, str]]:
    """This process's mappings of regular files: (start, end, path)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []  # not Linux: every tensor is published
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not fields[5].startswith("/") or fields[5].endswith("(deleted)"):
            continue
        path = fields[5]
        if path.startswith("/dev/") and not path.startswith("/dev/shm/"):
            continue
        low, high = fields[0].split("-")
        ranges.append((int(low, 16), int(high, 16), path))
    return ranges


def attach(
    roots: dict[str, nn.Module], views: dict[str, torch.Tensor], skeleton: bool = False
) -> int:
    """Point each tensor of ``roots`` named in ``views`` at its view; the bytes now mapped.

    ``skeleton``: the tensors were emptied (:func:`script_skeleton`), so their
    shapes are not compared. Raises ValueError when the structure does not
    match the file (another model under the same key would be a bug, not a
    condition to serve through).
    """
    collected, _ = collect(roots)
    unknown = [name for name in views if name not in collected]
    if unknown:
        raise ValueError(f"published weights do not match the model: no {unknown[:3]} here")
    # Tensors not in the file were left out as mapped from a model file already.
    mine = {name: collected[name] for name in views}
    for name, tensor in mine.items():
        view = views[name]
        # Every tensor is checked before any is swapped: a mismatch leaves the model whole.
        if view.dtype != tensor.dtype or (view.shape != tensor.shape and not skeleton):
            raise ValueError(
                f"published {name} is {dtype_name(view.dtype)}{list(view.shape)}, "
                f"the model's {dtype_name(tensor.dtype)}{list(tensor.shape)}"
            )
    total = 0
    with torch.no_grad():
        for name, tensor in mine.items():
            view = views[name]
            tensor.data = view
            total += view.numel() * view.element_size()
    return total


def script_skeleton(module: Any, tensors: dict[str, torch.Tensor]) -> bytes:
    """A TorchScript archive of ``module`` with every tensor in ``tensors`` emptied.

    Loading it costs the structure only; :func:`attach` then gives it the weights.
    The module's own tensors are put back before this returns.
    """
    kept = {name: tensor.data for name, tensor in tensors.items()}
    try:
        with torch.no_grad():
            for tensor in tensors.values():
                tensor.data = torch.empty(0, dtype=tensor.dtype)
        buffer = io.BytesIO()
        torch.jit.save(module, buffer)
        return buffer.getvalue()
    finally:
        with torch.no_grad():
            for name, tensor in tensors.items():
                tensor.data = kept[name]


def load_skeleton(skeleton: bytes, device: torch.device) -> torch.jit.ScriptModule:
    module: torch.jit.ScriptModule = torch.jit.load(  # type: ignore[no-untyped-call]
        io.BytesIO(skeleton), map_location=device
    )
    return module
