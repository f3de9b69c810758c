"""Settings <-> command line and environment, for every class of :mod:`shared.config`.

A field named ``max_batch_size`` is the flag ``--max-batch-size`` and the
environment variable ``TORCHPOOL_MAX_BATCH_SIZE``; a flag given on the command
line wins over the environment. A boolean that defaults to on also gets its
``--no-`` form. :func:`worker_argv` writes a model's settings back as the plain
command line a local or remote worker takes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from shared.config import ENV_PREFIX, ConfigError, ModelSettings, parse_bool

S = TypeVar("S", bound=ModelSettings)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def negated_flag(name: str) -> str:
    """``--no-elastic-cores``: how a boolean setting that defaults to on is turned off."""
    return "--no-" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def settings_fields(cls: type[Any]) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """Add one flag per setting; values stay strings until :func:`from_namespace`."""
    for f in settings_fields(cls):
        default = f.default
        shown = "" if default is None or default == {} else f" (default: {default})"
        help_text = f"{f.metadata['help']}{shown} [env {env_name(f.name)}]"
        if f.metadata["parse"] is parse_bool:
            parser.add_argument(
                flag(f.name), dest=f.name, action="store_const", const="1", help=help_text
            )
            if default is True:
                parser.add_argument(
                    negated_flag(f.name), dest=f.name, action="store_const", const="0",
                    help=f"Turn {flag(f.name)} off.",
                )  # fmt: skip
        else:
            parser.add_argument(flag(f.name), dest=f.name, metavar=f.name.upper(), help=help_text)


def from_namespace(
    cls: type[S], namespace: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> S:
    """Build settings from parsed flags, falling back to ``TORCHPOOL_*`` variables."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in settings_fields(cls):
        raw = getattr(namespace, f.name, None)
        source = flag(f.name)
        if raw is None and env_name(f.name) in environ:
            raw, source = environ[env_name(f.name)], env_name(f.name)
        if raw is None:
            continue
        parse = f.metadata["parse"]
        try:
            values[f.name] = parse(raw) if parse else raw
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        except ValueError as exc:
            raise ConfigError(f"{source}: {raw!r} is not a valid value") from exc
    return cls(**values)


def parse_settings(
    cls: type[S], argv: Sequence[str], environ: Mapping[str, str] | None = None
) -> S:
    """Parse a whole command line (tests use this directly)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser, cls)
    return from_namespace(cls, parser.parse_args(list(argv)), environ)


def worker_argv(settings: ModelSettings) -> list[str]:
    """The model flags a worker needs, as a plain command line."""
    argv: list[str] = []
    for f in settings_fields(ModelSettings):
        value = getattr(settings, f.name)
        # model_kwargs defaults to None and becomes {} in __post_init__: both are "unset".
        if value is None or value == f.default or value == {}:
            continue
        if f.metadata["parse"] is parse_bool:
            argv.append(flag(f.name) if value else negated_flag(f.name))
            continue
        if isinstance(value, dict):
            text = json.dumps(value)
        elif isinstance(value, tuple):
            text = ",".join(str(v) for v in value)
        else:
            text = str(value)
        # "--flag=value": argparse takes a separate "-1,16" for an option, not a value.
        argv.append(f"{flag(f.name)}={text}")
    return argv
