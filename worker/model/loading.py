"""Load the model once, from whichever source the settings name.

Sources, in the order they are tried:

    --handler MOD:CLS            a user class with load(device) and predict(batch)
    no --model                   the built-in demo model (worker.model.demo)
    --model F --model-class M:C  C(**kwargs).load_state_dict(torch.load(F, weights_only=True))
    --model F (torch.export)     torch.export.load(F).module(); row shape from the program
    --model F (TorchScript)      torch.jit.load(F)
    --model F (pickle)           torch.load(F), only with --trust-pickle

What a file is comes from :mod:`shared.modelfile`, which reads its structure
without unpickling anything; the gateway runs the same check before spawning.

Every failure is a :class:`shared.errors.ModelLoadError` with one line an
operator can act on; the worker sends it on the control channel and exits
with ``EXIT_LOAD_FAILED``.
"""

from __future__ import annotations

import importlib
import io
import pickle
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn

from shared import modelfile, protocol
from shared.config import ModelSettings
from shared.errors import ModelLoadError
from worker import pytree
from worker.codec import v2 as v2codec
from worker.codec.tensors import dtype_name
from worker.model import demo
from worker.model.assembly import Assembly
from worker.model.handler import accepts_of, assembly_of, optional_hook, preprocess_hook

# How many offending state_dict keys a message names before "(+N more)".
_SHOWN_KEYS: Final = 3


@dataclass
class LoadedModel:
    """A model ready to serve. Call :meth:`run` under ``torch.inference_mode()``."""

    forward: Callable[[torch.Tensor], Any]
    device: torch.device
    # One row without the batch dimension; -1 marks a variable size; None: unknown.
    input_shape: tuple[int, ...] | None
    input_dtype: str
    # demo, handler, state_dict, export, torchscript or pickle.
    source: str
    # preprocess(payload, content_type); see worker.model.handler for these hooks.
    preprocess: Callable[[Any, str], Any] | None = None
    postprocess: Callable[[Any], Any] | None = None
    accepts: tuple[str, ...] | None = None
    assembly: Assembly = field(default_factory=Assembly)
    # Whether input_dtype was asked for (a flag, a handler's attribute).
    dtype_asked: bool = False
    # The v2 outputs (name, dtype, shape) seen at warm-up; None: not known.
    outputs: list[dict[str, Any]] | None = None
    # A handler's predict_stream: one request's input -> a generator of outputs
    # (sync or async); requests then run one at a time (worker.serve.streaming).
    stream: Callable[[Any], Iterator[Any]] | None = None
    # The --handler instance, whose optional attributes codecs read (worker.codec.openai).
    handler: object | None = None

    def run(self, batch: Any) -> Any:
        """Forward one batch (a tensor or a pytree), moving it to the model's device first."""
        return self.forward(pytree.to_device(batch, self.device))


def one_line(text: str) -> str:
    """Collapse a (possibly multi-line) message to one line."""
    return " ".join(text.split())


def load_model(settings: ModelSettings, device: torch.device) -> LoadedModel:
    """Load what ``settings`` names onto ``device``, in eval mode.

    The ``--input-shape`` flag overrides the row shape the source carries, and
    ``--input-dtype`` its dtype when set to anything but the default float32.
    """
    try:
        model = _load(settings, device)
    except ModelLoadError as exc:
        raise ModelLoadError(one_line(exc.message)) from exc
    except Exception as exc:
        raise ModelLoadError(
            one_line(f"loading the model failed: {type(exc).__name__}: {exc}")
        ) from exc
    if settings.input_shape is not None:
        model.input_shape = settings.input_shape
    if settings.input_dtype is not None:
        model.input_dtype = settings.input_dtype
        model.dtype_asked = True
    return model


def _load(settings: ModelSettings, device: torch.device) -> LoadedModel:
    if settings.handler:
        return _load_handler(settings.handler, settings.model_kwargs, device)
    if settings.model is None:
        module = demo.build_demo_model().to(device)
        return LoadedModel(module, device, demo.INPUT_SHAPE, demo.INPUT_DTYPE, "demo")
    # The same check the gateway ran before spawning: it reads the file's
    # structure, never unpickles, and refuses what these flags cannot load.
    found = modelfile.check(
        settings.model, model_class=bool(settings.model_class), trust_pickle=settings.trust_pickle
    )
    path = found.path
    if found.kind == modelfile.EXPORT:
        return _load_export(path, device)
    if found.kind == modelfile.TORCHSCRIPT:
        return _load_torchscript(path, device)
    if settings.model_class:
        return _load_state_dict(path, settings.model_class, settings.model_kwargs, device)
    return _load_pickle(found, device)


# --- sources ------------------------------------------------------------------


def _load_export(path: Path, device: torch.device) -> LoadedModel:
    # torch.export.load takes a path only when it ends in .pt2; a buffer always.
    source: str | io.BytesIO = str(path) if path.suffix == ".pt2" else io.BytesIO(path.read_bytes())
    try:
        program = torch.export.load(source)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot load the torch.export program: {exc}") from exc
    shape, dtype = export_input_spec(program)
    # An exported module cannot switch to eval(): the mode was fixed at export.
    module = program.module()
    if device.type != "cpu":
        module = module.to(device)
    return LoadedModel(module, device, shape, dtype or "float32", "export")


def export_input_spec(
    program: torch.export.ExportedProgram,
) -> tuple[tuple[int, ...] | None, str | None]:
    """Row shape (batch dim dropped, symbolic dims as -1) and dtype of the first user input."""
    user_inputs = program.graph_signature.user_inputs
    if not user_inputs:
        return None, None
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name == user_inputs[0]:
            value = node.meta.get("val")
            if not isinstance(value, torch.Tensor) or value.ndim == 0:
                return None, None
            dims = tuple(dim if isinstance(dim, int) else -1 for dim in value.shape)
            return dims[1:], dtype_name(value.dtype)
    return None, None


def _load_torchscript(path: Path, device: torch.device) -> LoadedModel:
    try:
        # torch.jit.load is not annotated; it returns a ScriptModule.
        module: torch.jit.ScriptModule = torch.jit.load(  # type: ignore[no-untyped-call]
            str(path), map_location=device
        )
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot load the TorchScript archive: {exc}") from exc
    module.eval()
    return LoadedModel(module, device, None, "float32", "torchscript")


def _load_pickle(found: modelfile.ModelFile, device: torch.device) -> LoadedModel:
    """A pickled object the operator trusts (``--trust-pickle``): unpickle it whole."""
    path = found.path
    try:
        obj = torch.load(path, weights_only=False, map_location=device)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot unpickle: {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, nn.Module):
        obj.to(device).eval()
        return LoadedModel(obj, device, None, "float32", "pickle")
    if callable(obj):
        return LoadedModel(obj, device, None, "float32", "pickle")
    raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not a model")


def _load_state_dict(
    path: Path, class_path: str, kwargs: Mapping[str, Any], device: torch.device
) -> LoadedModel:
    model = build(import_object(class_path, "--model-class"), class_path, kwargs)
    if not isinstance(model, nn.Module):
        raise ModelLoadError(
            f"--model-class {class_path} built a {type(model).__name__}, not an nn.Module"
        )
    try:
        obj = _load_weights(path, device)
    except pickle.UnpicklingError as exc:
        # The sniff found only tensor globals, yet torch's weights_only loader,
        # the actual guard, refused one: say which.
        raise ModelLoadError(f"{path}: torch's weights-only loader refused it: {exc}") from exc
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a state_dict torch can read: {exc}") from exc
    state = _state_dict_of(obj)
    if state is None:
        raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    problem = state_dict_mismatch(model, state)
    if problem:
        raise ModelLoadError(f"{path} does not fit {class_path}: {problem}")
    # Memory-mapped CPU weights whose dtypes match are assigned, not copied: the
    # pages then come from the page cache, shared by every worker of the pool.
    current = model.state_dict()
    assign = device.type == "cpu" and all(
        current[key].dtype == value.dtype for key, value in state.items() if key in current
    )
    model.load_state_dict(state, assign=assign)
    model.to(device).eval()
    return LoadedModel(model, device, None, "float32", "state_dict")


def _load_weights(path: Path, device: torch.device) -> Any:
    """``torch.load`` with weights only; memory-mapped on CPU when the format allows."""
    if device.type == "cpu":
        try:
            return torch.load(path, weights_only=True, map_location=device, mmap=True)
        except RuntimeError:
            pass  # the legacy (non-zip) format cannot be mapped; read it instead
    return torch.load(path, weights_only=True, map_location=device)


def _state_dict_of(obj: Any) -> Mapping[str, torch.Tensor] | None:
    """The state_dict in ``obj``: itself, or a training checkpoint's ``state_dict``/``model``."""
    if not isinstance(obj, Mapping):
        return None
    if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return obj
    for key in ("state_dict", "model_state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and _state_dict_of(inner) is inner:
            return inner
    return None


def state_dict_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """One line naming the first few missing, unexpected and misshapen keys; '' if it fits."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    misshapen = [
        f"{key} (file {list(state[key].shape)}, model {list(expected[key].shape)})"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    parts = [
        f"{label}: {_first_few(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("size mismatch", misshapen),
        )
        if keys
    ]
    return "; ".join(parts)


def _first_few(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN_KEYS])
    more = len(items) - _SHOWN_KEYS
    return f"{shown} (+{more} more)" if more > 0 else shown


def _load_handler(class_path: str, kwargs: Mapping[str, Any], device: torch.device) -> LoadedModel:
    handler = build(import_object(class_path, "--handler"), class_path, kwargs)
    predict = getattr(handler, "predict", None)
    load = getattr(handler, "load", None)
    stream = optional_hook(handler, "predict_stream")
    if not callable(load) or not (callable(predict) or stream is not None):
        raise ModelLoadError(
            f"--handler {class_path} needs load(device) and predict(batch) "
            "(or predict_stream(x)) methods"
        )
    try:
        load(device)
    except Exception as exc:
        raise ModelLoadError(
            f"--handler {class_path}: load() failed: {type(exc).__name__}: {exc}"
        ) from exc
    shape = getattr(handler, "input_shape", None)
    dtype = getattr(handler, "input_dtype", None)
    if isinstance(dtype, torch.dtype):
        dtype = dtype_name(dtype)
    if dtype is not None and dtype not in protocol.DTYPE_SIZES:
        raise ModelLoadError(f"--handler {class_path}: input_dtype {dtype!r} is not a known dtype")
    try:
        row = None if shape is None else tuple(int(dim) for dim in shape)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(
            f"--handler {class_path}: input_shape {shape!r} is not a list of integers"
        ) from exc
    preprocess = preprocess_hook(handler)
    return LoadedModel(
        predict if callable(predict) else stream,
        device,
        row,
        dtype or "float32",
        "handler",
        preprocess=preprocess,
        postprocess=optional_hook(handler, "postprocess"),
        accepts=accepts_of(handler, class_path),
        assembly=assembly_of(
            handler, class_path, preprocess is not None or hasattr(handler, "pad_values")
        ),
        dtype_asked=dtype is not None,
        stream=stream,
        handler=handler,
    )


# --- user code ------------------------------------------------------------------


def import_object(path: str, flag: str) -> Any:
    """``package.module:Name`` -> the object, or a one-line ModelLoadError."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ModelLoadError(
                f"{flag} {path}: no module named {module_name!r} (is it on PYTHONPATH?)"
            ) from exc
        raise ModelLoadError(f"{flag} {path}: importing {module_name} failed: {exc}") from exc
    except Exception as exc:
        raise ModelLoadError(
            f"{flag} {path}: importing {module_name} failed: {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ModelLoadError(f"{flag} {path}: module {module_name!r} has no {attr!r}") from exc
    return obj


def build(cls: Any, path: str, kwargs: Mapping[str, Any]) -> Any:
    if not callable(cls):
        raise ModelLoadError(f"{path} is not a class")
    try:
        return cls(**kwargs)
    except Exception as exc:
        raise ModelLoadError(
            f"building {path}(**{dict(kwargs)!r}) failed: {type(exc).__name__}: {exc}"
        ) from exc


def warm_up(model: LoadedModel) -> bool:
    """One forward on zeros of batch 1 when the row shape is fully known.

    Returns whether it ran. A model that fails on the very shape it declares
    would fail every request, so that is a load failure, said once at boot.
    The output it gives (after ``postprocess``, when that takes zeros) tells
    ``model.outputs``.
    """
    shape = model.input_shape
    if shape is None or any(dim < 0 for dim in shape) or model.stream is not None:
        # A stream may run for long on any input: it is not run at boot.
        return False
    zeros = torch.zeros((1, *shape), dtype=getattr(torch, model.input_dtype))
    try:
        with torch.inference_mode():
            output = model.run(zeros)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise ModelLoadError(
            one_line(f"warm-up forward on zeros of shape {[1, *shape]} failed: {reason}")
        ) from exc
    try:
        if model.postprocess is not None:
            output = model.postprocess(output)
        model.outputs = v2codec.describe_outputs(output)
    except Exception:
        model.outputs = None  # a postprocess may need real data; the outputs stay unknown
    return True
