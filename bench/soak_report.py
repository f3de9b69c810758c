"""The soak run's records, its verdict against the targets, and the markdown section."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.common import MB

# The targets: per process, RSS may grow at most this much per hour after the
# warm-up; descriptors and sockets at rest must not outnumber those before.
MAX_SLOPE_MB_PER_HOUR = 5.0

# Every kind of request the soak sends, and the statuses that are its right answer.
EXPECTED: dict[str, frozenset[int]] = {
    "valid": frozenset({200}),
    "bad_json": frozenset({400}),
    "nan": frozenset({400}),
    "wrong_shape": frozenset({422}),
    "wrong_type": frozenset({415}),
}
# Clients that hang up early get no status; they count by how far they got.
DISCONNECTS = ("hangup_after_request", "hangup_mid_body")


@dataclass
class Sample:
    """One reading of one process: seconds since the load began, RSS and descriptors."""

    t_s: float
    rss_bytes: int
    fds: int
    sockets: int


@dataclass
class Process:
    """The gateway or one worker slot, and what was read of it."""

    name: str
    pid: int
    samples: list[Sample] = field(default_factory=list)
    # Descriptors at rest, before the load and after it settled.
    rest_before: tuple[int, int] = (0, 0)
    rest_after: tuple[int, int] = (0, 0)
    # Other pids the slot had during the run: a worker that was replaced.
    replaced_by: list[int] = field(default_factory=list)

    def slope_mb_per_hour(self, after_s: float) -> float | None:
        """Least-squares slope of RSS over the samples past ``after_s``; None if too few."""
        points = [(s.t_s / 3600, s.rss_bytes / MB) for s in self.samples if s.t_s >= after_s]
        if len(points) < 3:
            return None
        mean_t = sum(t for t, _ in points) / len(points)
        mean_m = sum(m for _, m in points) / len(points)
        spread = sum((t - mean_t) ** 2 for t, _ in points)
        if spread == 0:
            return None
        return sum((t - mean_t) * (m - mean_m) for t, m in points) / spread


@dataclass
class Outcomes:
    """What came back, per request kind: status (or a transport failure) and error code."""

    answers: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)
    valid_ms: list[float] = field(default_factory=list)

    def record(self, kind: str, status: str, code: str = "") -> None:
        self.sent[kind] += 1
        self.answers[(kind, status, code)] += 1

    def unexpected(self) -> list[tuple[tuple[str, str, str], int]]:
        return [
            (key, n)
            for key, n in sorted(self.answers.items())
            if key[0] in EXPECTED and not (key[1].isdigit() and int(key[1]) in EXPECTED[key[0]])
        ]


@dataclass
class Soak:
    minutes: float
    warmup_s: float
    workers: int
    clients: int
    rate: float
    sample_s: float
    started: str
    machine: str
    processes: list[Process]
    outcomes: Outcomes
    load_s: float = 0.0

    def verdicts(self) -> list[tuple[str, bool, str]]:
        out: list[tuple[str, bool, str]] = []
        for proc in self.processes:
            slope = proc.slope_mb_per_hour(self.warmup_s)
            out.append(
                (
                    f"{proc.name}: RSS slope under {MAX_SLOPE_MB_PER_HOUR:g} MB/hour",
                    slope is not None and slope < MAX_SLOPE_MB_PER_HOUR,
                    "too few samples past the warm-up" if slope is None else f"{slope:+.1f}",
                )
            )
            before, after = proc.rest_before, proc.rest_after
            out.append(
                (
                    f"{proc.name}: no leaked descriptors",
                    after[0] <= before[0] and after[1] <= before[1],
                    f"fds {before[0]} -> {after[0]}, sockets {before[1]} -> {after[1]}",
                )
            )
        restarts = [f"{p.name} ({len(p.replaced_by)})" for p in self.processes if p.replaced_by]
        out.append(("no worker replaced", not restarts, ", ".join(restarts) or "none"))
        unexpected = sum(n for _, n in self.outcomes.unexpected())
        out.append(("no unexpected errors", unexpected == 0, f"{unexpected}"))
        return out

    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.verdicts())

    def to_json(self) -> dict[str, Any]:
        # asdict would rebuild the Counters from their items, so they are spelled out.
        raw = {key: value for key, value in vars(self).items() if key != "outcomes"}
        raw["processes"] = [asdict(proc) for proc in self.processes]
        raw["outcomes"] = {
            "sent": dict(self.outcomes.sent),
            "answers": [
                {"kind": kind, "status": status, "code": code, "count": n}
                for (kind, status, code), n in sorted(self.outcomes.answers.items())
            ],
            "valid_ms": [round(ms, 2) for ms in self.outcomes.valid_ms],
        }
        raw["verdicts"] = [
            {"target": name, "passed": ok, "measured": detail}
            for name, ok, detail in self.verdicts()
        ]
        return raw


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def markdown(soak: Soak) -> str:
    outcomes = soak.outcomes
    total = sum(outcomes.sent.values())
    verdict = "PASS" if soak.passed() else "FAIL"
    lines = [
        f"## Soak: {soak.minutes:g} minutes under steady mixed load ({verdict})",
        "",
        f"Run {soak.started} on {soak.machine}: `torchpool serve` (demo model, "
        f"{soak.workers} workers) on loopback; {soak.clients} clients paced to "
        f"{soak.rate:g} requests/s in all ({total} requests in {soak.load_s:.0f} s, "
        f"{total / soak.load_s if soak.load_s else 0:.0f}/s), valid bodies mixed with bad "
        "JSON, NaN, wrong shapes, wrong content types and clients that hang up early. "
        f"Every {soak.sample_s:g} s: RSS, open descriptors and sockets of each process. "
        f"Slopes are least-squares fits past a {soak.warmup_s:.0f} s warm-up; descriptors "
        "are counted at rest, before the load and once it has settled after."
        + (
            " (This run is too short for its slopes to mean much: a few hundred kB of "
            "allocator noise over minutes reads as MB/hour.)"
            if soak.load_s - soak.warmup_s < 600
            else ""
        ),
        "",
        "| process | pid | RSS after warm-up (MB) | RSS at end (MB) | slope (MB/hour) "
        "| fds at rest | sockets at rest | fds under load (max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for proc in soak.processes:
        past = [s for s in proc.samples if s.t_s >= soak.warmup_s] or proc.samples
        slope = proc.slope_mb_per_hour(soak.warmup_s)
        lines.append(
            f"| {proc.name} | {proc.pid} | {past[0].rss_bytes / MB:.1f} "
            f"| {past[-1].rss_bytes / MB:.1f} "
            f"| {'-' if slope is None else f'{slope:+.1f}'} "
            f"| {proc.rest_before[0]} -> {proc.rest_after[0]} "
            f"| {proc.rest_before[1]} -> {proc.rest_after[1]} "
            f"| {max(s.fds for s in proc.samples)} |"
        )
    p50, p99 = _percentile(outcomes.valid_ms, 0.5), _percentile(outcomes.valid_ms, 0.99)
    lines += [
        "",
        f"Valid requests: {outcomes.sent['valid']}, latency p50 {p50:.1f} ms, p99 {p99:.1f} ms.",
        "",
        "| request kind | sent | answers | expected |",
        "|---|---:|---|---|",
    ]
    for kind in (*EXPECTED, *DISCONNECTS):
        answers = ", ".join(
            f"{status}{f' {code}' if code else ''}: {n}"
            for (k, status, code), n in sorted(outcomes.answers.items())
            if k == kind
        )
        want = (
            " or ".join(str(s) for s in sorted(EXPECTED[kind]))
            if kind in EXPECTED
            else "(no answer read)"
        )
        lines.append(f"| {kind} | {outcomes.sent[kind]} | {answers or '-'} | {want} |")
    unexpected = outcomes.unexpected()
    lines += ["", "Unexpected answers: " + (
        "; ".join(f"{kind} -> {status} {code}".rstrip() + f" ({n})"
                  for (kind, status, code), n in unexpected)
        if unexpected else "none."
    )]  # fmt: skip
    lines += ["", "| target | result | measured |", "|---|---|---|"]
    lines += [
        f"| {name} | {'pass' if ok else 'FAIL'} | {detail} |"
        for name, ok, detail in soak.verdicts()
    ]
    return "\n".join(lines) + "\n"
