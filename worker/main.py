"""The worker's boot sequence and exit codes.

    parse settings           bad flags      -> EXIT_BAD_CONFIG (2), one line on stderr
    pin cores / GPU          before torch is imported (this module never imports it at top)
    tie to the parent        local workers die with the gateway (prctl + ppid check)
    connect two DEALERs      data b"<uid>/d" (main thread), control b"<uid>/c" (control thread)
    HELLO, LOADING           at once, so the gateway sees a live process while it loads
    load, warm up            failure -> ERROR(model_load_failed, fatal) + EXIT_LOAD_FAILED (3)
    READY, then serve        until STOP, SIGTERM/SIGINT or the parent's death
    BYE, exit 0              after answering every request it holds

The torch-using modules (loading, serving, ...) are imported inside functions,
after :func:`worker.pinning.apply` has set the thread and device variables.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import zmq
import zmq.auth

from shared import protocol
from shared.config import ConfigError, WorkerSettings
from shared.errors import ModelLoadError
from shared.fingerprint import fingerprint as settings_fingerprint
from shared.flags import parse_settings
from shared.heap import freeze_startup_heap
from worker import pinning
from worker.board import Board, board_path
from worker.control import LINGER_MS, ControlThread, WorkerState
from worker.lending import Lending, TorchThreads
from worker.signals import SignalWake
from worker.stats import MemorySampler

if TYPE_CHECKING:
    from worker.model.loading import LoadedModel

PROG: Final = "torchpool worker"
# Set by ``--restart`` for its child: the pipe to write one byte to once ready.
READY_FD_ENV: Final = "TORCHPOOL_WORKER_READY_FD"
# linux/prctl.h
_PR_SET_PDEATHSIG: Final = 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run one worker; the return value is the process's exit status."""
    try:
        settings = parse_settings(WorkerSettings, sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return protocol.EXIT_BAD_CONFIG
    if settings.restart:
        from worker.restart import supervise

        return supervise(sys.argv[1:] if argv is None else list(argv))
    try:
        secure = curve_client(settings)
    except (OSError, ValueError) as exc:
        print(f"{PROG}: error: cannot read CURVE keys: {exc}", file=sys.stderr)
        return protocol.EXIT_BAD_CONFIG
    elastic = settings.elastic_cores and board_path(settings.connect) is not None
    try:
        pin = pinning.apply(settings.cores, settings.device, settings.gpu, elastic)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return protocol.EXIT_BAD_CONFIG
    parent = os.getppid() if settings.slot >= 0 else None
    if parent is not None and not die_with_parent(parent):
        print(f"{PROG}: the parent process exited before the worker started", file=sys.stderr)
        return 1
    uid = settings.uid or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    signals = SignalWake()
    signals.install()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    state = WorkerState(settings.max_batch_seconds)
    sampler = MemorySampler()
    control = ControlThread(
        ctx, settings.connect, uid, settings.heartbeat_s, state, sampler, parent, secure
    )
    control.start()
    data: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    data.setsockopt(zmq.IDENTITY, protocol.data_identity(uid))
    data.setsockopt(zmq.LINGER, LINGER_MS)
    secure(data)
    data.connect(settings.connect)
    try:
        return run(settings, pin, uid, data, control, state, sampler, signals)
    finally:
        data.close()
        control.close()
        # term() flushes what is queued (BYE, ERROR) within the linger; a
        # control thread that did not finish still holds a socket, and term
        # would wait for it forever.
        if not control.is_alive():
            ctx.term()


def curve_client(settings: WorkerSettings) -> Callable[[zmq.Socket[bytes]], None]:
    """How to make a socket a CurveZMQ client of the gateway (a no-op without keys)."""
    if not (settings.curve_secret and settings.curve_server_key):
        return lambda sock: None
    public, secret = zmq.auth.load_certificate(settings.curve_secret)
    server_public, _ = zmq.auth.load_certificate(settings.curve_server_key)
    if secret is None:
        raise ConfigError(f"{settings.curve_secret} holds no secret key")

    def secure(sock: zmq.Socket[bytes]) -> None:
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.curve_serverkey = server_public

    return secure


def die_with_parent(parent: int) -> bool:
    """Ask Linux to SIGTERM this process when its parent dies.

    Returns False when the parent is already gone (it died before prctl ran).
    The control thread also watches ``getppid()``, which covers other systems.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    return os.getppid() == parent


def run(
    settings: WorkerSettings,
    pin: pinning.Pinning,
    uid: str,
    data: zmq.Socket[bytes],
    control: ControlThread,
    state: WorkerState,
    sampler: MemorySampler,
    signals: SignalWake,
) -> int:
    """HELLO, load, READY, serve, BYE; the exit status."""
    hello: dict[str, Any] = {
        "t": protocol.HELLO,
        "v": protocol.VERSION,
        "slot": settings.slot,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "device": pin.label,
        "cores": list(pin.cores),
        "threads": pin.threads,
    }
    if settings.slot < 0:
        # A remote worker says which model it serves and with what, so the gateway
        # can refuse one started with another file or other flags.
        if settings.model_name:
            hello["model"] = settings.model_name
        try:
            hello["fingerprint"] = settings_fingerprint(settings)
        except OSError as exc:
            # The gateway refuses a worker it cannot check; this says why in /health.
            hello["fingerprint_error"] = f"cannot read its model file: {exc}"
    control.send(hello)
    control.send({"t": protocol.LOADING})
    started = time.monotonic()
    try:
        model = load(settings, pin, sampler)
    except ModelLoadError as exc:
        control.send({"t": protocol.ERROR, "code": exc.code, "message": exc.message, "fatal": True})
        print(f"{PROG}: cannot load model: {exc.message}", file=sys.stderr)
        return protocol.EXIT_LOAD_FAILED
    load_s = time.monotonic() - started
    freeze_startup_heap()  # before READY: its one collection must not delay a request
    if (reason := signals.stop_reason) is not None:
        control.send({"t": protocol.BYE, "reason": reason})
        return 0
    from worker.codec.openai import declared_routes  # torch is loaded by now

    # On the board before READY: a request the gateway sends once this worker is
    # ready may already borrow its cores, or find them busy.
    elastic = elastic_cores(settings, pin, model)
    control.send(
        {
            "t": protocol.READY,
            "load_s": round(load_s, 3),
            # A streaming model runs one request at a time: more would wait behind a stream.
            "capacity": 1 if model.stream is not None else 2 * settings.max_batch_size,
            "input_shape": None if model.input_shape is None else list(model.input_shape),
            "input_dtype": model.input_dtype,
            "signature": {
                "source": model.source,
                "outputs": model.outputs,
                "stream": model.stream is not None,
                "openai": declared_routes(model.handler, model.stream is not None),
                "weights": None if model.sharing is None else model.sharing.as_json(),
            },
            **sampler.sample(),
        }
    )
    tell_supervisor_ready()
    return serve(settings, pin, model, data, control, state, signals, elastic)


def tell_supervisor_ready() -> None:
    """Under ``torchpool worker --restart``: tell the supervising parent we are ready,
    so that a later death is not counted as a boot failure."""
    fd = os.environ.get(READY_FD_ENV)
    if fd is None or not fd.isdigit():
        return
    try:
        os.write(int(fd), b"r")
        os.close(int(fd))
    except OSError:
        pass  # a parent that went away: nothing to tell


def load(settings: WorkerSettings, pin: pinning.Pinning, sampler: MemorySampler) -> LoadedModel:
    """Import torch (pinned by now, or, for elastic cores, right after the import by
    ``configure_torch``), pick the device, load and warm up."""
    try:
        import torch
    except ImportError as exc:
        raise ModelLoadError(f"torch cannot be imported: {exc}") from exc
    from worker.codec.openai import declared_routes
    from worker.model.loading import load_model, warm_up
    from worker.stats import torch_cuda_probe

    pinning.configure_torch(pin)
    use_cuda = pin.kind == "cuda" or (pin.kind == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {settings.device}: no CUDA device is visible")
    # CUDA_VISIBLE_DEVICES holds only the worker's GPU, so it is always index 0 here.
    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    if use_cuda:
        sampler.install_cuda_probe(torch_cuda_probe(0))
    model = load_model(settings, device)
    declared_routes(model.handler, model.stream is not None)  # refuses what it cannot serve
    warm_up(model)
    if model.sharing is not None:
        held = model.sharing
        how = "shared" if held.shared else "private (not shared)"
        print(f"{PROG}: weights {how}: {held.reason}", file=sys.stderr, flush=True)
    release_free_heap()
    return model


def release_free_heap() -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``).

    Loading frees what the mapped weights replaced and what unpickling
    needed; glibc keeps such pages in its arenas, where they count as this
    worker's private memory for as long as it lives.
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def serve(
    settings: WorkerSettings,
    pin: pinning.Pinning,
    model: LoadedModel,
    data: zmq.Socket[bytes],
    control: ControlThread,
    state: WorkerState,
    signals: SignalWake,
    elastic: tuple[Lending | None, Board | None] = (None, None),
) -> int:
    from worker.serve.loop import ServingLoop

    lending, board = elastic
    loop = ServingLoop(
        data,
        model,
        state,
        max_batch_size=settings.max_batch_size,
        max_batch_delay_ms=settings.max_batch_delay_ms,
        max_body_bytes=settings.max_body_bytes,
        threads=pin.threads,
        lending=lending,
    )
    try:
        stop = loop.serve(control, signals)
        if stop.drain:
            loop.drain()
    finally:
        if board is not None:
            board.disown(pin.cores)
            board.close()
    control.send({"t": protocol.BYE, "reason": stop.reason})
    return stop.status


def elastic_cores(
    settings: WorkerSettings, pin: pinning.Pinning, model: LoadedModel
) -> tuple[Lending | None, Board | None]:
    """Lending for a local CPU worker with --elastic-cores; (None, None) otherwise.

    Remote workers, GPU workers and streaming models keep their own cores.
    A board that cannot be opened (a read-only runtime directory) turns
    lending off with a line on stderr: the worker serves as before.
    """
    path = board_path(settings.connect)
    if not settings.elastic_cores or path is None or model.device.type != "cpu":
        return None, None
    if model.stream is not None or len(pin.host) <= len(pin.cores):
        return None, None
    try:
        board = Board(path)
    except OSError as exc:
        print(f"{PROG}: elastic cores off: cannot open {path}: {exc}", file=sys.stderr)
        return None, None
    board.own(pin.cores)
    return Lending(board, pin.cores, pin.host, TorchThreads()), board
