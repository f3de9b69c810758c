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

from shared.config import ConfigError, ServeSettings, add_arguments, from_namespace
from shared.errors import ModelLoadError

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
    try:
        settings = from_namespace(ServeSettings, namespace)
        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        from gateway.server import serve

        return serve(settings)
    except ConfigError as exc:
        print(f"torchpool: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ModelLoadError as exc:
        print(f"torchpool: error: cannot serve: {exc}", file=sys.stderr)
        return EXIT_MODEL


def serve_main() -> int:
    """``python -m gateway``: the same as ``torchpool serve``."""
    return main(["serve", *sys.argv[1:]])
