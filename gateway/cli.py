"""The ``torchpool`` command: ``serve`` runs the gateway and its pool; ``worker`` joins one.

Every flag is also read from ``TORCHPOOL_<FLAG>``; see ``shared.config``.
Errors an operator can fix are one line on stderr and a non-zero exit, never
a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from shared import modelconfig, modelfile
from shared.config import ConfigError, ServeSettings
from shared.errors import ModelLoadError
from shared.flags import add_arguments, env_name, from_namespace, settings_fields

EXIT_CONFIG = 2
EXIT_MODEL = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchpool",
        description="Serve a PyTorch model over HTTP from a pool of pinned worker processes.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="run the HTTP gateway and its local worker pool", description=__doc__
    )
    add_arguments(serve, ServeSettings)
    keys = commands.add_parser(
        "keys",
        help="write a CurveZMQ key pair NAME.key (public) and NAME.key_secret (secret)",
    )
    keys.add_argument("name", help="e.g. server, or a worker's name")
    keys.add_argument("--dir", default=".", help="folder to write the pair into (default: .)")
    commands.add_parser(
        "worker",
        help="run one worker that joins a gateway (see: torchpool worker --help)",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "worker":
        # A worker is its own interpreter with torch in it; the gateway package
        # never imports it, so hand the command line straight over.
        os.execv(sys.executable, [sys.executable, "-m", "worker", *args[1:]])
    namespace = build_parser().parse_args(args)
    if namespace.command == "keys":
        return write_keys(namespace.name, Path(namespace.dir))
    try:
        config = load_config(namespace)
        logging.basicConfig(
            level=config.server.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        for name, settings in config.models.items():
            if settings.model and not settings.handler:
                # What every worker would refuse, refused before one is spawned.
                try:
                    modelfile.check(
                        settings.model,
                        model_class=bool(settings.model_class),
                        trust_pickle=settings.trust_pickle,
                    )
                except ModelLoadError as exc:
                    if config.source is None:
                        raise
                    raise ConfigError(f"{config.where('models.' + name)}model: {exc}") from exc
        from gateway.server import serve

        return serve(config)
    except ConfigError as exc:
        print(f"torchpool: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ModelLoadError as exc:
        print(f"torchpool: error: cannot serve: {exc}", file=sys.stderr)
        return EXIT_MODEL


def load_config(namespace: argparse.Namespace) -> modelconfig.Config:
    """The flags as a config of one model, or --config's file with the server flags on top."""
    settings = from_namespace(ServeSettings, namespace)
    if settings.config is None:
        return modelconfig.from_flags(settings)
    given = {
        f.name
        for f in settings_fields(ServeSettings)
        if getattr(namespace, f.name, None) is not None or env_name(f.name) in os.environ
    } - {"config"}
    for name in sorted(given - modelconfig.SERVER_KEYS):
        raise ConfigError(
            f"--{name.replace('_', '-')} is a model setting: with --config it goes in the "
            f"file's [models.NAME] tables (or [server], for every model)"
        )
    overrides = {name: getattr(settings, name) for name in given}
    return modelconfig.load(settings.config, overrides)


def write_keys(name: str, folder: Path) -> int:
    """``torchpool keys``: one key pair in ZeroMQ's certificate format."""
    import zmq.auth

    if not name or "/" in name or name.startswith("."):
        print(f"torchpool: error: {name!r} is not a plain key name", file=sys.stderr)
        return EXIT_CONFIG
    public = folder / f"{name}.key"
    secret = folder / f"{name}.key_secret"
    if public.exists() or secret.exists():
        print(f"torchpool: error: {public} or {secret} exists already", file=sys.stderr)
        return EXIT_CONFIG
    folder.mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(str(folder), name)
    secret.chmod(0o600)
    print(f"wrote {public} (give to the other side) and {secret} (keep private)")
    return 0


def serve_main() -> int:
    """``python -m gateway``: the same as ``torchpool serve``."""
    return main(["serve", *sys.argv[1:]])
