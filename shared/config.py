"""Settings: one typed, validated object for the CLI, the environment and tests.

Each setting is a dataclass field; its ``help`` metadata is its one and only
documentation (``torchpool serve --help`` and the README's flag table are made
from it). A field named ``max_batch_size`` is the flag ``--max-batch-size`` and
the environment variable ``TORCHPOOL_MAX_BATCH_SIZE``; a flag given on the
command line wins over the environment.

``ModelSettings`` is what a worker needs; ``PoolSettings`` adds one model's pool
(a ``[models.NAME]`` table of a config file, see :mod:`shared.modelconfig`),
``ServerSettings`` the HTTP server (the ``[server]`` table), and
``ServeSettings``, both: the command line of ``torchpool serve``. The gateway
hands a local worker its settings as plain command-line flags
(:func:`shared.flags.worker_argv`), the same flags a remote ``torchpool worker``
takes; :mod:`shared.flags` turns these classes into flags and back.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.protocol import DTYPE_SIZES

ENV_PREFIX = "TORCHPOOL_"


class ConfigError(ValueError):
    """A setting that cannot work; its message is one line for the operator."""


def _opt(
    default: Any, help: str, parse: Callable[[str], Any] | None = None, **metadata: Any
) -> Any:
    return field(default=default, metadata={"help": help, "parse": parse, **metadata})


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3,224,224"`` -> ``(3, 224, 224)``; ``-1`` marks a variable dimension."""
    text = text.strip().strip("[]()")
    if not text:
        return ()
    try:
        dims = tuple(int(part) for part in re.split(r"[,x\s]+", text) if part)
    except ValueError as exc:
        raise ConfigError(f"input shape {text!r} is not a list of integers") from exc
    if any(dim < -1 or dim == 0 for dim in dims):
        raise ConfigError(f"input shape {text!r}: dimensions are positive, or -1 for variable")
    return dims


def parse_json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"model kwargs are not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ConfigError("model kwargs must be a JSON object, e.g. '{\"hidden\": 64}'")
    return value


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"{text!r} is not a boolean (use 1/0, true/false)")


OPENAI_ROUTES = ("embeddings", "chat", "completions")


def parse_openai_routes(text: str) -> tuple[str, ...]:
    """``"chat,completions"`` -> ``("chat", "completions")``; each one of OPENAI_ROUTES."""
    routes = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [route for route in routes if route not in OPENAI_ROUTES]
    if unknown:
        raise ConfigError(
            f"unknown OpenAI route {unknown[0]!r}; the routes are {', '.join(OPENAI_ROUTES)}"
        )
    return routes


def parse_cores(text: str) -> tuple[int, ...]:
    """``"0-3,6"`` -> ``(0, 1, 2, 3, 6)``, as in /proc/<pid>/status."""
    cores: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, _, high = part.partition("-")
        try:
            cores.extend(range(int(low), int(high or low) + 1))
        except ValueError as exc:
            raise ConfigError(f"core list {text!r} is not like 0-3,6") from exc
    return tuple(cores)


_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _check_import_path(flag: str, value: str | None) -> None:
    if value is not None and not _IMPORT_PATH.match(value):
        raise ConfigError(f"--{flag} {value!r} must look like package.module:ClassName")


@dataclass(frozen=True)
class ModelSettings:
    """What to serve and how a worker runs it."""

    model: str | None = _opt(
        None,
        "Model file: a TorchScript archive, a torch.export program (.pt2), a state_dict "
        "(with --model-class) or a pickled nn.Module (with --trust-pickle). "
        "None serves the built-in demo model.",
    )
    model_class: str | None = _opt(
        None, "package.module:Class to build before loading a state_dict from --model."
    )
    model_kwargs: dict[str, Any] = _opt(
        None,
        "JSON object of constructor arguments for --model-class or --handler.",
        parse_json_object,
    )
    handler: str | None = _opt(
        None, "package.module:Class with load() and predict(batch), for models that need code."
    )
    trust_pickle: bool = _opt(
        False,
        "Allow loading a whole pickled nn.Module. Unpickling runs arbitrary code: "
        "only for files you trust.",
        parse_bool,
    )
    model_name: str | None = _opt(
        None,
        "Name the model is served under; default: the model file's stem, else the "
        "--handler class's name in lower case, else 'demo'.",
    )
    input_shape: tuple[int, ...] | None = _opt(
        None,
        "Shape of one input row without the batch dimension, e.g. 16 or 3,224,224 "
        "(-1 for a variable size). Requests that do not match get 422.",
        parse_shape,
    )
    input_dtype: str | None = _opt(
        None,
        "dtype the input is converted to, e.g. float32 or int64; default: what the model "
        "declares (a torch.export program, a handler), else float32.",
    )
    device: str = _opt(
        "cpu",
        "cpu, cuda (all visible GPUs), a list such as cuda:0,2 (cuda:N: the N-th visible GPU, "
        "as torch counts them), or auto (cuda if present).",
    )
    max_batch_size: int = _opt(
        8, "Most rows a worker runs in one forward pass; 1 turns batching off.", int
    )
    max_batch_delay_ms: float = _opt(
        2.0,
        "Cap on how long a batch waits for more requests (adaptive: it waits only while "
        "that can pay).",
        float,
    )
    max_body_mb: float = _opt(64.0, "Largest request body accepted, in MiB (413 past it).", float)
    heartbeat_s: float = _opt(1.0, "Seconds between worker heartbeats.", float)
    elastic_cores: bool = _opt(
        True,
        "A CPU worker's forward pass borrows the cores of workers idle at that moment (any "
        "model's), for that pass only; off: each worker always runs on its own cores. "
        "No effect on GPU and remote workers (see docs/elastic-cores.md).",
        parse_bool,
    )
    no_shared_weights: bool = _opt(
        False,
        "Each CPU worker loads its own private copy of the weights instead of mapping the "
        "one copy the first worker published (see docs/shared-weights.md).",
        parse_bool,
    )
    weights_dir: str | None = _opt(
        None,
        "Folder where CPU workers of this model publish and map their shared weights. The "
        "gateway sets it for its local workers (a folder of its own under --weights-cache, "
        "removed when the model goes); remote workers of one host may share one given here.",
    )

    def __post_init__(self) -> None:
        if self.model_kwargs is None:
            object.__setattr__(self, "model_kwargs", {})
        _check_import_path("model-class", self.model_class)
        _check_import_path("handler", self.handler)
        if self.handler and self.model_class:
            raise ConfigError("--handler and --model-class are two ways to load; give one")
        if self.model_class and not self.model:
            raise ConfigError("--model-class needs --model, the state_dict file to load")
        if self.model_kwargs and not (self.model_class or self.handler):
            raise ConfigError("--model-kwargs only applies with --model-class or --handler")
        if self.input_dtype is not None and self.input_dtype not in DTYPE_SIZES:
            raise ConfigError(
                f"--input-dtype {self.input_dtype!r} is not one of {', '.join(DTYPE_SIZES)}"
            )
        if self.max_batch_size < 1:
            raise ConfigError("--max-batch-size must be at least 1")
        if self.max_batch_delay_ms < 0:
            raise ConfigError("--max-batch-delay-ms cannot be negative")
        if self.max_body_mb <= 0:
            raise ConfigError("--max-body-mb must be positive")
        if self.heartbeat_s <= 0:
            raise ConfigError("--heartbeat-s must be positive")
        parse_device(self.device)

    @property
    def served_name(self) -> str:
        if self.model_name:
            return self.model_name
        if self.model:
            return Path(self.model).stem
        if self.handler:
            return self.handler.rpartition(":")[2].lower()
        return "demo"

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


@dataclass(frozen=True)
class PoolSettings(ModelSettings):
    """One model's pool: its settings plus how many workers, its queue and deadlines.

    In a config file this is one ``[models.NAME]`` table.
    """

    workers: int = _opt(2, "Number of local worker processes.", int)
    cores_per_worker: int | None = _opt(
        None, "CPU cores pinned to each worker; default: the usable cores split evenly.", int
    )
    queue_size: int = _opt(
        256, "Requests that may wait for a worker; past it the client gets 503.", int
    )
    timeout_s: float = _opt(30.0, "Deadline of a request, in seconds (504 past it).", float)
    max_batch_seconds: float | None = _opt(
        None,
        "Longest a worker's forward pass may run before the worker is killed and replaced; "
        "its requests get 503 and are not retried. 0: never. Default: --timeout-s, since "
        "past that every request in the batch has had its 504 and nobody waits for it.",
        float,
    )
    min_ready: int = _opt(1, "Ready workers needed for /health/ready to answer 200.", int)
    heartbeat_liveness: int = _opt(
        3, "Missed heartbeats after which a worker is declared dead.", int
    )
    drain_timeout_s: float = _opt(
        30.0, "On shutdown, how long in-flight requests may take to finish.", float
    )
    max_requests_per_worker: int = _opt(
        0,
        "Replace a worker after it has served this many requests (0: never); the "
        "replacement is ready before the old one is drained.",
        int,
    )
    max_worker_rss_mb: float = _opt(
        0.0, "Replace a worker whose RSS grows past this many MiB (0: never).", float
    )
    openai: tuple[str, ...] | None = _opt(
        None,
        "OpenAI API routes the model serves: embeddings, chat, completions (comma-separated; "
        "a list in a config file). Default: what its handler's openai_routes declares.",
        parse_openai_routes,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.workers < 0:
            raise ConfigError("--workers cannot be negative")
        if self.cores_per_worker is not None and self.cores_per_worker < 1:
            raise ConfigError("--cores-per-worker must be at least 1")
        if self.queue_size < 0:
            raise ConfigError("--queue-size cannot be negative")
        if self.timeout_s <= 0:
            raise ConfigError("--timeout-s must be positive")
        if self.max_batch_seconds is not None and self.max_batch_seconds < 0:
            raise ConfigError("--max-batch-seconds cannot be negative")
        if self.min_ready < 1:
            raise ConfigError("--min-ready must be at least 1")
        if self.heartbeat_liveness < 1:
            raise ConfigError("--heartbeat-liveness must be at least 1")
        if self.drain_timeout_s < 0:
            raise ConfigError("--drain-timeout-s cannot be negative")
        if self.max_requests_per_worker < 0:
            raise ConfigError("--max-requests-per-worker cannot be negative")
        if self.max_worker_rss_mb < 0:
            raise ConfigError("--max-worker-rss-mb cannot be negative")
        if self.model and not Path(self.model).exists():
            raise ConfigError(f"model file {self.model!r} does not exist")

    @property
    def batch_limit_s(self) -> float | None:
        """The forward-pass limit in force: --max-batch-seconds, else --timeout-s; None: none."""
        limit = self.timeout_s if self.max_batch_seconds is None else self.max_batch_seconds
        return limit or None


@dataclass(frozen=True)
class ServerSettings:
    """The gateway's own settings, shared by every model: the ``[server]`` table."""

    host: str = _opt("127.0.0.1", "Address the HTTP server listens on.")
    port: int = _opt(8000, "Port the HTTP server listens on (0: any free port).", int)
    api_key: str | None = _opt(
        None,
        "Bearer token(s), comma-separated, required on /predict and /v2 (401 without); "
        "health probes stay open. Prefer the environment variable to the flag.",
    )
    admin_token: str | None = _opt(
        None,
        "Bearer token for /admin endpoints (runtime scaling, loading and reloading models); "
        "they are off without it.",
    )
    grpc_port: int | None = _opt(
        None,
        "Port of the gRPC server (KServe's inference.GRPCInferenceService, Triton's "
        "streaming and extensions, grpc.health.v1, reflection); off when unset.",
        int,
    )
    grpc_tls_cert: str | None = _opt(
        None, "PEM certificate chain for the gRPC server (with --grpc-tls-key); plaintext without."
    )
    grpc_tls_key: str | None = _opt(None, "PEM private key of --grpc-tls-cert.")
    bind: str | None = _opt(
        None, "Endpoint remote workers join, e.g. tcp://0.0.0.0:5555 (local workers use ipc)."
    )
    curve_secret: str | None = _opt(
        None, "The gateway's CurveZMQ secret key file (server.key_secret) for --bind."
    )
    curve_allow: str | None = _opt(
        None, "Folder of admitted workers' public keys (*.key) for --bind with CURVE."
    )
    insecure_tcp: bool = _opt(
        False,
        "Allow --bind on a non-loopback address without CURVE (unauthenticated!).",
        parse_bool,
    )
    log_level: str = _opt("info", "Log level: debug, info, warning or error.")
    access_log: bool = _opt(
        False,
        "Log one line per HTTP request (uvicorn's access log: client, method, path, status).",
        parse_bool,
    )
    default_model: str | None = _opt(
        None, "With several models: the one plain POST /predict goes to (else it is 404)."
    )
    strict: bool = _opt(
        False,
        "Exit when any model fails to load at start (default: only when every model did).",
        parse_bool,
    )
    weights_cache: str = _opt(
        "/dev/shm",
        "Folder under which the gateway keeps the weights its CPU workers share (one "
        "folder per gateway, removed when it exits; a later start removes what a killed "
        "gateway left). Memory-backed (/dev/shm) unless you name a disk folder.",
    )

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # ServeSettings: the model's checks first
            parent()
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port {self.port} is not a TCP port")
        _check_bind(self)
        _check_grpc(self)
        if self.log_level not in {"debug", "info", "warning", "error"}:
            raise ConfigError(f"--log-level {self.log_level!r} is not debug/info/warning/error")


@dataclass(frozen=True)
class ServeSettings(ServerSettings, PoolSettings):
    """Everything ``torchpool serve`` takes: the server and, without --config, its one model."""

    config: str | None = _opt(
        None,
        "TOML file with a [server] table and one [models.NAME] table per model "
        "(see docs/config.md); the model flags then come from it.",
    )

    def server_settings(self) -> ServerSettings:
        return ServerSettings(**_values(self, ServerSettings))

    def pool_settings(self) -> PoolSettings:
        return PoolSettings(**_values(self, PoolSettings))


def _values(settings: object, cls: type[Any]) -> dict[str, Any]:
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class WorkerSettings(ModelSettings):
    """Everything ``torchpool worker`` (and ``python -m worker``) takes."""

    connect: str = _opt("", "Gateway endpoint to join, e.g. tcp://gateway:5555.")
    uid: str | None = _opt(None, "Worker id on the wire; the gateway sets it for local workers.")
    slot: int = _opt(-1, "Pool slot of a local worker; -1 for a remote one.", int)
    cores: tuple[int, ...] | None = _opt(
        None, "CPU cores to pin to, e.g. 0-3,6; default: every usable core.", parse_cores
    )
    gpu: int | None = _opt(
        None, "Physical GPU index this worker owns (CUDA_VISIBLE_DEVICES holds just it).", int
    )
    curve_secret: str | None = _opt(
        None, "This worker's CurveZMQ secret key file (NAME.key_secret), for a CURVE gateway."
    )
    curve_server_key: str | None = _opt(
        None, "The gateway's CurveZMQ public key file (server.key), for a CURVE gateway."
    )
    max_batch_seconds: float | None = _opt(
        None,
        "Longest one forward pass (or one streamed output) may run before the worker "
        "ends itself from inside (exit code 1, every thread's stack on stderr), even "
        "when stuck in C code: a watchdog that needs no GIL. For a remote worker, which "
        "no gateway can kill; give it the gateway's value. Default: no limit.",
        float,
    )
    restart: bool = _opt(
        False,
        "Run the worker as a child process and start it again when it exits, with the "
        "gateway's rules: at once after a worker that was ready, with exponential backoff "
        "after one that died booting, and give up after 5 such deaths in a row (or at "
        "once when the model cannot load and never has). SIGTERM/SIGINT stop both.",
        parse_bool,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_batch_seconds is not None and self.max_batch_seconds < 0:
            raise ConfigError("--max-batch-seconds cannot be negative")
        if not self.connect:
            raise ConfigError("--connect is required: the gateway endpoint to join")
        if bool(self.curve_secret) != bool(self.curve_server_key):
            raise ConfigError("--curve-secret and --curve-server-key go together")
        for path in (self.curve_secret, self.curve_server_key):
            if path and not Path(path).is_file():
                raise ConfigError(f"key file {path!r} does not exist")
        if self.cores is not None and not self.cores:
            raise ConfigError("--cores is empty")


def _check_grpc(settings: ServerSettings) -> None:
    if settings.grpc_port is not None and not 0 <= settings.grpc_port < 65536:
        raise ConfigError(f"--grpc-port {settings.grpc_port} is not a TCP port")
    if bool(settings.grpc_tls_cert) != bool(settings.grpc_tls_key):
        raise ConfigError("--grpc-tls-cert and --grpc-tls-key go together")
    if settings.grpc_tls_cert and settings.grpc_port is None:
        raise ConfigError("--grpc-tls-cert/--grpc-tls-key only apply with --grpc-port")
    for path in (settings.grpc_tls_cert, settings.grpc_tls_key):
        if path and not Path(path).is_file():
            raise ConfigError(f"TLS file {path!r} does not exist")


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def _check_bind(settings: ServerSettings) -> None:
    """Remote workers over TCP: CURVE keys, or loopback, or an explicit opt-out."""
    if not settings.bind:
        if settings.curve_secret or settings.curve_allow:
            raise ConfigError("--curve-secret/--curve-allow only apply with --bind")
        return
    scheme, _, rest = settings.bind.partition("://")
    host = rest.rpartition(":")[0]
    if scheme != "tcp" or not host or not rest.rpartition(":")[2].isdigit():
        raise ConfigError(f"--bind {settings.bind!r} must look like tcp://HOST:PORT")
    if bool(settings.curve_secret) != bool(settings.curve_allow):
        raise ConfigError("--curve-secret and --curve-allow go together")
    if settings.curve_secret and not Path(settings.curve_secret).is_file():
        raise ConfigError(f"key file {settings.curve_secret!r} does not exist")
    if settings.curve_allow and not Path(settings.curve_allow).is_dir():
        raise ConfigError(f"--curve-allow {settings.curve_allow!r} is not a folder")
    if not settings.curve_secret and host not in LOOPBACK_HOSTS and not settings.insecure_tcp:
        raise ConfigError(
            f"--bind {settings.bind} is reachable beyond this machine: give --curve-secret "
            "and --curve-allow (see `torchpool keys`), or --insecure-tcp to accept anyone"
        )


@dataclass(frozen=True)
class DeviceSpec:
    """A parsed ``--device``: ``kind`` is cpu, cuda or auto; ``gpus`` None means all."""

    kind: str
    gpus: tuple[int, ...] | None = None


def parse_device(text: str) -> DeviceSpec:
    value = text.strip().lower()
    if value in {"cpu", "auto", "cuda"}:
        return DeviceSpec(value)
    if value.startswith("cuda:"):
        # "cuda:0,2" and "cuda:0,cuda:2" name the same GPUs.
        parts = [part.strip().removeprefix("cuda:") for part in value[5:].split(",")]
        try:
            gpus = tuple(int(part) for part in parts if part)
        except ValueError:
            gpus = ()
        if gpus and all(g >= 0 for g in gpus):
            return DeviceSpec("cuda", gpus)
    raise ConfigError(f"--device {text!r} must be cpu, cuda, cuda:0,2 or auto")
