"""``python -m worker``: the entry point the gateway spawns."""

from worker.main import main

raise SystemExit(main())
