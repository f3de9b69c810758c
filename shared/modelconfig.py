"""The models a gateway serves: a TOML config file, or today's flags as a config of one.

    [server]                     # ServerSettings, plus defaults for every model
    port = 8000
    admin_token = "..."
    timeout_s = 10               # a pool setting here is every model's default

    [models.classifier]          # PoolSettings; the table's name is the served name
    model = "classifier.pt"      # relative to the config file's folder
    workers = 2
    input_shape = [3, 224, 224]

    [models.embedder]
    handler = "mypkg.embed:Handler"
    model_kwargs = { dim = 384 }

Keys have the flags' names (``max_batch_size`` is ``--max-batch-size``).
Anything the file gets wrong (an unknown key, a value of the wrong type, a
model file that is not there) is a :class:`ConfigError` whose one line names
the file, the table and the key.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.config import (
    ConfigError,
    PoolSettings,
    ServerSettings,
    ServeSettings,
    parse_bool,
    parse_openai_routes,
    parse_shape,
)
from shared.flags import settings_fields

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# What says which model a [models.NAME] table is; never a default in [server].
MODEL_ONLY = frozenset(
    {"model", "model_class", "model_kwargs", "handler", "trust_pickle", "input_shape",
     "input_dtype", "model_name"}
)  # fmt: skip
SERVER_KEYS = frozenset(f.name for f in settings_fields(ServerSettings))
POOL_KEYS = frozenset(f.name for f in settings_fields(PoolSettings))
_FLAG = re.compile(r"--([a-z][a-z-]*)")


@dataclass(frozen=True)
class Config:
    """The server's settings and each model's, by served name (in the file's order)."""

    server: ServerSettings
    models: dict[str, PoolSettings]
    source: str | None = None  # the config file, None for flags

    def __post_init__(self) -> None:
        default = self.server.default_model
        if default is not None and default not in self.models:
            raise ConfigError(
                f"{self.where('server')}default_model: {default!r} is not a served model "
                f"({', '.join(self.models) or 'none'})"
            )

    def where(self, table: str) -> str:
        """``"file: [table] "`` for messages; empty for the command line."""
        return f"{self.source}: [{table}] " if self.source else ""


def valid_name(name: str) -> bool:
    return bool(NAME.match(name))


def from_flags(settings: ServeSettings) -> Config:
    """Today's command line: a config with one model, named by --model-name or the file."""
    pool = settings.pool_settings()
    return Config(settings.server_settings(), {pool.served_name: pool})


def load(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read a config file; ``overrides`` (server settings from flags) win over [server]."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    for key in document:
        if key not in ("server", "models"):
            raise ConfigError(f"{path}: unknown table [{key}]; expected [server] and [models.NAME]")
    server_table = _table(path, document, "server")
    models_table = _table(path, document, "models")
    server_values: dict[str, Any] = {}
    defaults: dict[str, Any] = {}
    for key, value in server_table.items():
        if key in SERVER_KEYS:
            server_values[key] = _coerce(path, "server", key, value, ServerSettings)
        elif key in POOL_KEYS and key not in MODEL_ONLY:
            defaults[key] = _coerce(path, "server", key, value, PoolSettings)
        else:
            raise ConfigError(f"{path}: [server] {key}: unknown key{_hint(key)}")
    server_values.update(overrides or {})
    server = _build(path, "server", ServerSettings, server_values)
    if not models_table:
        raise ConfigError(f"{path}: no [models.NAME] table: nothing to serve")
    models = {
        name: model_settings(name, table, str(path), defaults, path.parent)
        for name, table in models_table.items()
    }
    return Config(server, models, str(path))


def model_settings(
    name: str,
    table: Any,
    source: str,
    defaults: Mapping[str, Any] | None = None,
    folder: Path | None = None,
) -> PoolSettings:
    """One ``[models.NAME]`` table (from a file, or an admin request's JSON body)."""
    label = f"models.{name}"
    if not valid_name(name):
        raise ConfigError(f"{source}: [{label}]: a model name is letters, digits, '_', '.' and '-'")
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{label}]: must be a table")
    values = dict(defaults or {})
    for key, value in table.items():
        if key == "model_name":
            raise ConfigError(f"{source}: [{label}] model_name: the table's name is the name")
        if key not in POOL_KEYS:
            raise ConfigError(f"{source}: [{label}] {key}: unknown key{_hint(key)}")
        values[key] = _coerce(source, label, key, value, PoolSettings)
    if isinstance(values.get("model"), str):
        # Relative to the file, so the config means the same from any directory.
        values["model"] = str(((folder or Path.cwd()) / values["model"]).resolve())
    values["model_name"] = name
    built: PoolSettings = _build(source, label, PoolSettings, values)
    return built


def _table(path: Path, document: dict[str, Any], key: str) -> dict[str, Any]:
    table = document.get(key, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {key} must be a table, [{key}]")
    return table


def _hint(key: str) -> str:
    if key in SERVER_KEYS:
        return f" here ({key} belongs in [server])"
    if key in POOL_KEYS:
        return f" in [server] ({key} is a model setting: put it in [models.NAME])"
    return ""


def _coerce(path: str | Path, table: str, key: str, value: Any, cls: type[Any]) -> Any:
    """A TOML value as the field wants it; strings are parsed as the flag's text would be."""
    field = next(f for f in dataclasses.fields(cls) if f.name == key)
    parse = field.metadata.get("parse")
    where = f"{path}: [{table}] {key}"
    try:
        if isinstance(value, str) and parse is not None:
            return parse(value)
        if parse is parse_bool:
            if isinstance(value, bool):
                return value
        elif parse is parse_shape:
            if isinstance(value, list) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value
            ):
                return parse_shape(",".join(str(v) for v in value))
        elif parse is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif parse is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
        elif key == "model_kwargs":
            if isinstance(value, dict):
                return value
        elif parse is parse_openai_routes:
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return parse(",".join(value))
        elif parse is None and isinstance(value, str):
            return value
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"{where}: {value!r} is not a valid value") from exc
    raise ConfigError(f"{where}: {value!r} is not {_expected(parse, key)}")


def _expected(parse: Any, key: str) -> str:
    if parse is parse_bool:
        return "true or false"
    if parse is parse_shape:
        return "a list of integers such as [3, 224, 224]"
    if parse is int:
        return "an integer"
    if parse is float:
        return "a number"
    if key == "model_kwargs":
        return "a table such as { hidden = 64 }"
    if parse is parse_openai_routes:
        return 'a list of OpenAI routes such as ["embeddings"]'
    return "a string"


def _build(path: str | Path, table: str, cls: type[Any], values: dict[str, Any]) -> Any:
    """``cls(**values)``, its ConfigError naming the key its message is about."""
    try:
        return cls(**values)
    except ConfigError as exc:
        message = str(exc)
        found = _FLAG.search(message)
        if found is not None:
            key = found.group(1).replace("-", "_")
        elif message.startswith("model file"):
            key = "model"
        else:
            key = ""
        raise ConfigError(f"{path}: [{table}] {key}{': ' if key else ''}{message}") from exc
