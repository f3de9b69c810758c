"""Print the README's flag table from the settings dataclass, so the two never disagree.

.venv/bin/python scripts/flags_table.py
"""

from __future__ import annotations

from shared.config import ServeSettings, env_name, flag, parse_bool, settings_fields


def _default(value: object, is_switch: bool) -> str:
    if is_switch:
        return "off"
    if value is None:
        return "—"
    return f"`{value}`"


def table() -> str:
    lines = ["| Flag | Environment variable | Default | Meaning |", "|---|---|---|---|"]
    for f in settings_fields(ServeSettings):
        shown = f"`{flag(f.name)}`"
        help_text = " ".join(str(f.metadata["help"]).split()).replace("|", "\\|")
        default = _default(f.default, f.metadata["parse"] is parse_bool)
        lines.append(f"| {shown} | `{env_name(f.name)}` | {default} | {help_text} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
