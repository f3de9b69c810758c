"""``python -m gateway [flags]`` is ``torchpool serve [flags]``."""

from gateway.cli import serve_main

raise SystemExit(serve_main())
