"""The chaos soak's records, its verdict against the targets, and its markdown report.

Targets (issue #19): no wrong answer, no hung request, a non-200 only where the
rules allow one, every stream ending with ``end`` or ``error``, and the
gateway's RSS, descriptors and threads flat after the warm-up.

What the rules allow: a request whose worker died under it after its retries
were spent (503 "... before answering this request"); a 503 at once from a
model in a crash loop (its worker died by itself twice in a row while booting);
a 504 at the deadline for a request that waited for a worker that was coming
and did not come in time (its message says so); a stream cut by its worker's
death once it had sent outputs (200, then an ``error`` event); and a reload
that failed because chaos killed one of its new workers (the old ones serve
on). Anything else is a violation; the allowed ones are counted apart.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench.common import MB

# Gateway growth allowed past the warm-up (chaos churns connections and workers).
MAX_RSS_GROWTH_MB = 16.0
MAX_FDS_GROWTH = 16
MAX_THREADS_GROWTH = 2
# Non-200 answers the rules allow, by a phrase of their message, and how each is shown.
ALLOWED = {
    (503, "before answering this request"): "503 (its worker died under it)",
    (503, "(a crash loop)"): "503 (crash loop)",
    (504, "no worker became ready within the deadline"): "504 (waited for a worker)",
}


@dataclass
class GatewaySample:
    t_s: float
    rss_bytes: int
    fds: int
    threads: int


@dataclass
class Tally:
    """Every answer by client kind and outcome, and the ones that broke a target."""

    answers: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)
    hung: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    unended: list[str] = field(default_factory=list)
    chaos: Counter[str] = field(default_factory=Counter)

    def note(self, kind: str, outcome: str) -> None:
        self.answers[f"{kind} -> {outcome}"] += 1

    def total(self, kind: str) -> int:
        return sum(n for key, n in self.answers.items() if key.startswith(f"{kind} -> "))


@dataclass
class ChaosSoak:
    minutes: float
    warmup_s: float
    started: str
    machine: str
    command: str
    tally: Tally
    samples: list[GatewaySample]
    exit_code: int | None = None
    stop_s: float | None = None

    def _after_warmup(self) -> tuple[list[GatewaySample], list[GatewaySample]]:
        warm = [s for s in self.samples if s.t_s < self.warmup_s]
        return warm, [s for s in self.samples if s.t_s >= self.warmup_s]

    def verdicts(self) -> list[tuple[str, bool, str]]:
        t = self.tally
        out = [
            ("no wrong answer", not t.wrong, f"{len(t.wrong)}"),
            ("no hung request", not t.hung, f"{len(t.hung)}"),
            ("non-200 only where the rules allow", not t.violations, f"{len(t.violations)}"),
            ("every stream ends with end or error", not t.unended, f"{len(t.unended)}"),
            ("the gateway stops cleanly (exit 0)", self.exit_code == 0, f"{self.exit_code}"),
        ]
        warm, after = self._after_warmup()
        if not warm or not after:
            out.append(("gateway flat after the warm-up", False, "too few samples"))
            return out
        base = warm[-1]
        rss = (max(s.rss_bytes for s in after) - base.rss_bytes) / MB
        fds = max(s.fds for s in after) - max(s.fds for s in warm)
        threads = max(s.threads for s in after) - max(s.threads for s in warm)
        out += [
            (
                f"gateway RSS grows under {MAX_RSS_GROWTH_MB:g} MB past the warm-up",
                rss < MAX_RSS_GROWTH_MB,
                f"{rss:+.1f} MB",
            ),
            (f"gateway fds grow by at most {MAX_FDS_GROWTH}", fds <= MAX_FDS_GROWTH, f"{fds:+d}"),
            (
                f"gateway threads grow by at most {MAX_THREADS_GROWTH}",
                threads <= MAX_THREADS_GROWTH,
                f"{threads:+d}",
            ),
        ]
        return out

    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.verdicts())

    def to_json(self) -> dict[str, Any]:
        t = self.tally
        return {
            "minutes": self.minutes,
            "warmup_s": self.warmup_s,
            "started": self.started,
            "machine": self.machine,
            "command": self.command,
            "answers": dict(sorted(t.answers.items())),
            "chaos": dict(t.chaos),
            "wrong": t.wrong[:50],
            "hung": t.hung[:50],
            "violations": t.violations[:50],
            "unended": t.unended[:50],
            "exit_code": self.exit_code,
            "stop_s": self.stop_s,
            "samples": [vars(s) for s in self.samples],
            "verdicts": [
                {"target": n, "passed": ok, "measured": m} for n, ok, m in self.verdicts()
            ],
        }


def markdown(run: ChaosSoak) -> str:
    verdict = "PASS" if run.passed() else "FAIL"
    lines = [
        f"## Chaos soak: {run.minutes:g} minutes, every feature at once ({verdict})",
        "",
        f"`{run.command}`, started {run.started} on {run.machine} (a shared machine).",
        "",
        "| target | measured | |",
        "|---|---|---|",
    ]
    for name, ok, measured in run.verdicts():
        lines.append(f"| {name} | {measured} | {'ok' if ok else '**FAIL**'} |")
    lines += [
        "",
        "Chaos done: " + ", ".join(f"{k} {n}" for k, n in sorted(run.tally.chaos.items())),
    ]
    lines += ["", "Answers:", ""]
    lines += [f"- {key}: {n}" for key, n in sorted(run.tally.answers.items())]
    for title, items in (
        ("Wrong answers", run.tally.wrong),
        ("Hung", run.tally.hung),
        ("Violations", run.tally.violations),
        ("Streams without end or error", run.tally.unended),
    ):
        if items:
            lines += ["", f"{title} (first 5):", ""] + [f"- {item}" for item in items[:5]]
    if run.stop_s is not None:
        lines += ["", f"SIGTERM to exit: {run.stop_s:.1f} s."]
    return "\n".join(lines) + "\n"
