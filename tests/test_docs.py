"""The documentation site against the code: the options page and the package map must not drift.

Fast tier: no processes. The commands and requests in the docs are run by
tests/test_docs_commands.py.
"""

from __future__ import annotations

import re

import pytest

from scripts.flags_table import PAGE, page
from tests.conftest import ROOT

pytestmark = pytest.mark.fast

PACKAGES = ("gateway", "worker", "shared")


def test_options_page_matches_the_settings() -> None:
    assert PAGE.read_text() == page(), "run: .venv/bin/python scripts/flags_table.py"


def _modules() -> set[str]:
    """Every module of the three packages, as a path (``gateway/api/app.py``)."""
    return {
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if path.name not in {"__init__.py", "__main__.py"}
    }


def test_architecture_page_names_every_module_and_only_those() -> None:
    """The package map in docs/architecture.md is the tree: a module added, moved or
    removed must be added, moved or removed there too."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:gateway|worker|shared)/[\w/]+\.py)`", text))
    modules = _modules()
    assert not modules - named, f"add to docs/architecture.md: {sorted(modules - named)}"
    assert not named - modules, f"no longer in the tree: {sorted(named - modules)}"
