"""The README's flag tables are printed from the settings; they must not drift."""

from __future__ import annotations

import pytest

from scripts.flags_table import table, worker_table
from tests.conftest import ROOT

pytestmark = pytest.mark.fast


def test_readme_flag_tables_match_the_settings() -> None:
    readme = (ROOT / "README.md").read_text()
    assert table() in readme, "run: .venv/bin/python scripts/flags_table.py"
    assert worker_table() in readme, "run: .venv/bin/python scripts/flags_table.py"
