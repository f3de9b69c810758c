"""Print the README's flag table from the settings dataclass, so the two never disagree.

.venv/bin/python scripts/flags_table.py
"""

from __future__ import annotations

from shared.config import (
    ModelSettings,
    ServeSettings,
    WorkerSettings,
    env_name,
    flag,
    negated_flag,
    parse_bool,
    settings_fields,
)


def _default(value: object, is_switch: bool) -> str:
    if is_switch:
        return "on" if value else "off"
    if value is None:
        return "—"
    return f"`{value}`"


def table(cls: type[ModelSettings] = ServeSettings, only_own: bool = False) -> str:
    """The markdown table of ``cls``'s flags; ``only_own`` leaves out the model flags."""
    lines = ["| Flag | Environment variable | Default | Meaning |", "|---|---|---|---|"]
    inherited = {f.name for f in settings_fields(ModelSettings)} if only_own else set()
    for f in settings_fields(cls):
        if f.name in inherited:
            continue
        shown = f"`{flag(f.name)}`"
        if f.metadata["parse"] is parse_bool and f.default is True:
            shown += f" / `{negated_flag(f.name)}`"
        help_text = " ".join(str(f.metadata["help"]).split()).replace("|", "\\|")
        default = _default(f.default, f.metadata["parse"] is parse_bool)
        lines.append(f"| {shown} | `{env_name(f.name)}` | {default} | {help_text} |")
    return "\n".join(lines)


def worker_table() -> str:
    """``torchpool worker``'s own flags (it also takes every model flag)."""
    return table(WorkerSettings, only_own=True)


if __name__ == "__main__":
    print(table())
    print()
    print(worker_table())
