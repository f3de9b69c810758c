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
import time
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
from worker.model import demo, weights
from worker.model.assembly import Assembly
from worker.model.handler import accepts_of, assembly_of, optional_hook, preprocess_hook
from worker.model.sharing import Mapped, Sharing, Store, content_key

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
    # The modules that hold the weights, by name (see worker.model.weights).
    roots: dict[str, Any] = field(default_factory=dict)
    # The state_dict's tensors are views of the model file itself (torch.load mmap).
    file_mapped: bool = False
    # How the weights are held, for READY and /health; set by load_model.
    sharing: Sharing | None = None
    # The published file this worker maps; kept alive as long as the model.
    mapped: Mapped | None = None

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
    started = time.monotonic()
    try:
        model = _load_shared(settings, device)
        if model.sharing is not None:
            model.sharing.load_s = round(time.monotonic() - started, 3)
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


# --- sharing ----------------------------------------------------------------------

FILE_MAPPED: Final = "its tensors map the model file itself (torch.load mmap)"
MAPPED: Final = "mapped what another worker published; its own copy, loaded first, is freed"


def _kind(settings: ModelSettings) -> str:
    if settings.handler:
        return "handler"
    if settings.model is None:
        return "demo"
    found = modelfile.check(
        settings.model, model_class=bool(settings.model_class), trust_pickle=settings.trust_pickle
    )
    if found.kind == modelfile.EXPORT:
        return "export"
    if found.kind == modelfile.TORCHSCRIPT:
        return "torchscript"
    return "state_dict" if settings.model_class else "pickle"


def _why_private(settings: ModelSettings, device: torch.device, kind: str) -> str | None:
    """Why this worker cannot share its weights, or None when it can."""
    if settings.no_shared_weights:
        return "--no-shared-weights"
    if device.type != "cpu":
        return f"a {device.type} worker keeps its weights on its device"
    if kind == "demo":
        return "the built-in demo model is built in microseconds"
    if not settings.weights_dir:
        return "no --weights-dir (the gateway gives one to each local worker)"
    return None


def _load_shared(settings: ModelSettings, device: torch.device) -> LoadedModel:
    """Load, sharing the weights with the other workers of this host where possible."""
    kind = _kind(settings)
    why = _why_private(settings, device, kind)
    if why is not None:
        model = _load(settings, device)
        model.sharing = Sharing(False, why)
        return model
    assert settings.weights_dir is not None
    store = Store(Path(settings.weights_dir), content_key(settings, kind))
    loaded: LoadedModel | None = None
    try:
        if kind == "torchscript":
            # Worth waiting for: once published, the structure loads from a
            # weightless skeleton. Workers that boot together take turns.
            with store.turn():
                mapped = store.open()
                if mapped is None:
                    loaded = _load(settings, device)
                    return _publish(loaded, store)
            return (
                _from_skeleton(mapped, device)
                if mapped.skeleton
                else _attach(_load(settings, device), mapped)
            )
        # Every other kind loads in full anyway: in parallel, then the turn only
        # to publish, or to find what another worker published and map it.
        loaded = _load(settings, device)
        with store.turn():
            mapped = store.open()
            if mapped is None:
                return _publish(loaded, store)
        return _attach(loaded, mapped)
    except (OSError, ValueError) as exc:
        # Shared memory full, a folder not writable...: serve from a private copy.
        model = loaded or _load(settings, device)
        model.sharing = Sharing(False, f"sharing failed: {one_line(str(exc))}")
        return model


def _publish(model: LoadedModel, store: Store) -> LoadedModel:
    """First worker: write the weights to the store, then serve from the mapping too."""
    if model.file_mapped:
        model.sharing = Sharing(True, FILE_MAPPED)
        return model
    tensors, private = weights.collect(model.roots)
    if not tensors:
        model.sharing = Sharing(False, "the model holds no nn.Module parameters or buffers")
        return model
    in_files = weights.file_backed(tensors)
    if len(in_files) == len(tensors):
        files = ", ".join(sorted(set(in_files.values())))
        model.sharing = Sharing(True, f"its tensors map the model's files ({files})")
        return model
    tensors = {name: t for name, t in tensors.items() if name not in in_files}
    skeleton = None
    if model.source == "torchscript":
        skeleton = weights.script_skeleton(model.forward, tensors)
    store.publish(tensors, skeleton)
    mapped = store.open()
    if mapped is None:
        raise OSError(f"{store.path} vanished right after it was published")
    shared = weights.attach(model.roots, mapped.tensors)
    model.mapped = mapped
    reason = _shared_reason(private, in_files)
    model.sharing = Sharing(True, reason, str(mapped.path), shared)
    return model


def _attach(model: LoadedModel, mapped: Mapped) -> LoadedModel:
    """A later worker that loaded the model: swap its tensors for the mapped ones."""
    if model.file_mapped:
        model.sharing = Sharing(True, FILE_MAPPED)
        return model
    shared = weights.attach(model.roots, mapped.tensors)
    model.mapped = mapped
    model.sharing = Sharing(True, MAPPED, str(mapped.path), shared, mapped=True)
    return model


def _from_skeleton(mapped: Mapped, device: torch.device) -> LoadedModel:
    """A later TorchScript worker: the weightless archive, then the mapped weights."""
    assert mapped.skeleton is not None
    module = weights.load_skeleton(mapped.skeleton, device)
    module.eval()
    model = LoadedModel(module, device, None, "float32", "torchscript", roots={"": module})
    shared = weights.attach(model.roots, mapped.tensors, skeleton=True)
    model.mapped = mapped
    how = "mapped what another worker published; structure from its skeleton archive"
    model.sharing = Sharing(True, how, str(mapped.path), shared, mapped=True)
    return model


def _shared_reason(private: int, in_files: dict[str, str]) -> str:
    parts = ["published"]
    if in_files:
        parts.append(f"{len(in_files)} tensors map the model's files already")
    if private:
        parts.append(f"{private} bytes of tensors the format cannot hold stay private")
    return "; ".join(parts)


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
        share = not settings.no_shared_weights
        return _load_state_dict(path, settings.model_class, settings.model_kwargs, device, share)
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
    return LoadedModel(module, device, shape, dtype or "float32", "export", roots={"": module})


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
    return LoadedModel(module, device, None, "float32", "torchscript", roots={"": module})


def _load_pickle(found: modelfile.ModelFile, device: torch.device) -> LoadedModel:
    """A pickled object the operator trusts (``--trust-pickle``): unpickle it whole."""
    path = found.path
    try:
        obj = torch.load(path, weights_only=False, map_location=device)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot unpickle: {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, nn.Module):
        obj.to(device).eval()
        return LoadedModel(obj, device, None, "float32", "pickle", roots={"": obj})
    if callable(obj):
        return LoadedModel(obj, device, None, "float32", "pickle")
    raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not a model")


def _load_state_dict(
    path: Path,
    class_path: str,
    kwargs: Mapping[str, Any],
    device: torch.device,
    share: bool = True,
) -> LoadedModel:
    cls = import_object(class_path, "--model-class")
    try:
        obj, mapped = _load_weights(path, device, share)
    except pickle.UnpicklingError as exc:
        # The sniff found only tensor globals, yet torch's weights_only loader,
        # the actual guard, refused one: say which.
        raise ModelLoadError(f"{path}: torch's weights-only loader refused it: {exc}") from exc
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a state_dict torch can read: {exc}") from exc
    state = _state_dict_of(obj)
    if state is None:
        raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    model = _assigned(cls, class_path, kwargs, state, device)
    if model is None:
        model = _built(cls, class_path, kwargs)
        problem = state_dict_mismatch(model, state)
        if problem:
            raise ModelLoadError(f"{path} does not fit {class_path}: {problem}")
        model.load_state_dict(state)
    model.to(device).eval()
    # Memory-mapped CPU weights assigned as they are: the pages come from the
    # model file in the page cache, shared by every worker of the host.
    file_mapped = mapped and all(
        tensor.data_ptr() == state[key].data_ptr() for key, tensor in model.state_dict().items()
    )
    return LoadedModel(
        model, device, None, "float32", "state_dict", roots={"": model}, file_mapped=file_mapped
    )


def _built(cls: Any, class_path: str, kwargs: Mapping[str, Any]) -> nn.Module:
    model = build(cls, class_path, kwargs)
    if not isinstance(model, nn.Module):
        raise ModelLoadError(
            f"--model-class {class_path} built a {type(model).__name__}, not an nn.Module"
        )
    return model


def _assigned(
    cls: Any,
    class_path: str,
    kwargs: Mapping[str, Any],
    state: Mapping[str, torch.Tensor],
    device: torch.device,
) -> nn.Module | None:
    """Build the class on the meta device and assign the file's tensors: no initial weights.

    None when that cannot work (the constructor computes on its tensors, a
    non-persistent buffer would stay on meta, the file does not fit): the
    caller then builds it for real, as before, and says what does not fit.
    """
    try:
        with torch.device("meta"):
            model = cls(**kwargs)
    except Exception:
        return None
    if not isinstance(model, nn.Module) or state_dict_mismatch(model, state):
        return None
    current = model.state_dict()
    # A tensor of another dtype is converted, as load_state_dict's copy would.
    fitted = {
        key: value if value.dtype == current[key].dtype else value.to(current[key].dtype)
        for key, value in state.items()
    }
    model.load_state_dict(fitted, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        return None
    return model


def _load_weights(path: Path, device: torch.device, share: bool) -> tuple[Any, bool]:
    """``torch.load`` with weights only, and whether it is memory-mapped (on CPU, when
    the format allows and ``share``: else every worker reads its own copy)."""
    if share and device.type == "cpu":
        try:
            return torch.load(path, weights_only=True, map_location=device, mmap=True), True
        except RuntimeError:
            pass  # the legacy (non-zip) format cannot be mapped; read it instead
    return torch.load(path, weights_only=True, map_location=device), False


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
        roots=weights.handler_roots(handler),
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
