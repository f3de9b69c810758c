"""bench/RESULTS.md: the tables, the ratios and the computed target lines."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench.common import LIT, RECIPE1, RECIPE2, SERVER_KEYS, TOLERANCE, TP, Results, Run


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "-"


@dataclass
class Target:
    name: str
    passed: bool
    detail: str


# Throughput targets: (model, concurrency, peer, factor): torchpool's req/s >= factor x peer's.
_RATE_TARGETS = [
    ("heavy", 64, LIT, 2.0),
    ("heavy", 64, RECIPE2, 3.0),
    ("small", 64, RECIPE1, 1.0),
    ("small", 64, LIT, 2.4),
    # Issue #11: never slower than `uvicorn --workers 2` (heavy: every load; small: c=8, 64).
    ("heavy", 1, RECIPE2, 1.0),
    ("heavy", 8, RECIPE2, 1.0),
    ("small", 8, RECIPE2, 1.0),
    ("small", 64, RECIPE2, 1.0),
]
# c=1 latency: (model, ms): torchpool's p50 <= the one-process recipe's + ms.
_LATENCY_TARGETS = [("heavy", 0.3), ("small", 0.15)]
_PEER_NAMES = {LIT: "LitServe", RECIPE1: "one-process recipe", RECIPE2: "uvicorn --workers 2"}
GATEWAY_RSS_MB = 50
MODELS = ("heavy", "small")


def _rate_name(model: str, c: int, peer: str, factor: float) -> str:
    times = "" if factor == 1 else f"{factor:g}x "
    return f"{model} c={c}: torchpool req/s >= {times}{_PEER_NAMES[peer]}"


def expected_targets() -> list[str]:
    """Every target line a complete run writes, in order."""
    names = [_rate_name(*target) for target in _RATE_TARGETS]
    names += [f"{m} c=64: torchpool p99 <= LitServe's and uvicorn --workers 2's" for m in MODELS]
    names += [f"{m} c=1: torchpool p50 <= recipe p50 + {ms:g} ms" for m, ms in _LATENCY_TARGETS]
    for model in MODELS:
        names.append(f"{model}: torchpool gateway RSS < {GATEWAY_RSS_MB} MB")
        names.append(f"{model}: torchpool total PSS <= uvicorn --workers 2's")
    return names


def targets(results: Results) -> list[Target]:
    out: list[Target] = []

    def get(model: str, server: str, c: int) -> Run | None:
        return results.run(model, server, c)

    def clean(*runs: Run | None) -> bool:
        return all(r is not None and r.errors == 0 for r in runs)

    for model, c, peer, factor in _RATE_TARGETS:
        tp, other = get(model, TP, c), get(model, peer, c)
        if tp and other:
            out.append(
                Target(
                    _rate_name(model, c, peer, factor),
                    tp.requests_per_s >= factor * other.requests_per_s and clean(tp),
                    f"{tp.requests_per_s:.0f} vs {other.requests_per_s:.0f} "
                    f"({_ratio(tp.requests_per_s, other.requests_per_s)})",
                )
            )
    for model in MODELS:
        tp, lit, uv2 = get(model, TP, 64), get(model, LIT, 64), get(model, RECIPE2, 64)
        if tp and lit and uv2:
            out.append(
                Target(
                    f"{model} c=64: torchpool p99 <= LitServe's and uvicorn --workers 2's",
                    tp.p99_ms <= lit.p99_ms and tp.p99_ms <= uv2.p99_ms and clean(tp),
                    f"{tp.p99_ms:.1f} ms vs {lit.p99_ms:.1f} ms (LitServe), "
                    f"{uv2.p99_ms:.1f} ms (uvicorn --workers 2)",
                )
            )
    for model, ms in _LATENCY_TARGETS:
        tp, uv1 = get(model, TP, 1), get(model, RECIPE1, 1)
        if tp and uv1:
            out.append(
                Target(
                    f"{model} c=1: torchpool p50 <= recipe p50 + {ms:g} ms",
                    tp.p50_ms <= uv1.p50_ms + ms and clean(tp),
                    f"{tp.p50_ms:.2f} ms vs {uv1.p50_ms:.2f} ms (+{tp.p50_ms - uv1.p50_ms:.2f} ms)",
                )
            )
    for model in MODELS:
        mem = results.mem(model, TP)
        if mem:
            out.append(
                Target(
                    f"{model}: torchpool gateway RSS < {GATEWAY_RSS_MB} MB",
                    mem.parent_rss_mb < GATEWAY_RSS_MB,
                    f"{mem.parent_rss_mb:.1f} MB",
                )
            )
        uv2m = results.mem(model, RECIPE2)
        if mem and uv2m:
            out.append(
                Target(
                    f"{model}: torchpool total PSS <= uvicorn --workers 2's",
                    mem.pss_mb <= uv2m.pss_mb,
                    f"{mem.pss_mb:.0f} MB vs {uv2m.pss_mb:.0f} MB",
                )
            )
    have = {target.name for target in out}
    out += [
        Target(name, False, "no data (a run is missing)")
        for name in expected_targets()
        if name not in have
    ]
    return out


def report(results: Results, concurrencies: Sequence[int]) -> str:
    lines = [
        "# torchpool benchmark results",
        "",
        f"Run of {results.started} (UTC), {results.seconds / 60:.1f} minutes, written by "
        "`bench/run.sh` (`bench/bench.py`). Raw numbers: `bench/out/results.json`; every "
        "wrk output and server log: `bench/out/`.",
        "",
        "## Machine",
        "",
    ]
    lines += [f"- {key}: {value}" for key, value in results.machine.items()]
    lines += [
        "",
        "**The load generator (wrk, one thread) shares these cores with the servers**: "
        "on a 2-core machine every server competes with wrk for CPU, so absolute numbers "
        "are lower than on a dedicated box; the comparison is fair because every server "
        "pays the same.",
        "",
        "## Commands",
        "",
        "Every server: two workers/processes and one torch thread per process "
        "(`OMP_NUM_THREADS=1` and `torch.set_num_threads(1)` in the peers; torchpool pins "
        "each worker to one core and sets the same by itself). Ports are free ports "
        "found at run time (`PORT`); `W` is the model's state_dict in `bench/out/weights/`.",
        "",
    ]
    for label, command in results.commands.items():
        lines.append(f"- {label}: `{command}`")
    lines += [
        "",
        "Each server x concurrency: a 2 s wrk warm-up at that concurrency, then the "
        "measured run. Before measuring, one answer is checked against the model run "
        f"in-process (abs tol {TOLERANCE:g}). Bodies are one row of JSON "
        '(`{"input_tensor": [[...]]}`), `content-type: application/json`.',
        "",
    ]
    lines += [f"- {note}" for note in results.notes]
    for model in ("heavy", "small"):
        shape = "512->3072->3072->10" if model == "heavy" else "16->32->4"
        lines += [
            "",
            f"## {model} (MLP {shape})",
            "",
            f"Ratios: {TP} at the same concurrency against the row's "
            "server (req/s: higher is better for torchpool; p99: lower is better). "
            "other load: cores used by processes outside the benchmark during the run "
            "(0 on a quiet machine). CPU ms/req: CPU time of the server's whole process "
            "tree per answered request (in brackets: its parent process alone, which for "
            "torchpool is the gateway); unlike req/s it barely moves with other load.",
            "",
            "| server | c | req/s | p50 ms | p99 ms | errors | tp req/s ratio | tp p99 ratio "
            "| CPU ms/req (parent) | other load |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for concurrency in concurrencies:
            tp = results.run(model, TP, concurrency)
            for label in SERVER_KEYS.values():
                run = results.run(model, label, concurrency)
                if run is None:
                    continue
                ratios = ("", "")
                if tp is not None and label != TP:
                    ratios = (
                        _ratio(tp.requests_per_s, run.requests_per_s),
                        _ratio(tp.p99_ms, run.p99_ms),
                    )
                lines.append(
                    f"| {label} | {concurrency} | {run.requests_per_s:,.0f} | "
                    f"{run.p50_ms:.2f} | {run.p99_ms:.2f} | {run.errors} | "
                    f"{ratios[0]} | {ratios[1]} | {run.cpu_ms_per_request:.3f} "
                    f"({run.parent_cpu_ms_per_request:.3f}) | {run.other_load:.2f} |"
                )
    lines += [
        "",
        "## Memory (whole process tree, after the server's runs)",
        "",
        "| model | server | processes | total RSS MB | total PSS MB | parent/gateway RSS MB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for mem in results.memory:
        lines.append(
            f"| {mem.model} | {mem.server} | {mem.processes} | {mem.rss_mb:.0f} | "
            f"{mem.pss_mb:.0f} | {mem.parent_rss_mb:.1f} |"
        )
    lines += [
        "",
        "## In-process ceiling (the model's forward alone, one thread, no HTTP)",
        "",
        "| model | batch | ms per forward | rows/s, 1 process | rows/s, x2 processes |",
        "|---|---:|---:|---:|---:|",
    ]
    for ceil in results.ceilings:
        lines.append(
            f"| {ceil.model} | {ceil.batch} | {ceil.ms_per_forward:.3f} | "
            f"{ceil.rows_per_s:,.0f} | {2 * ceil.rows_per_s:,.0f} |"
        )
    lines += [
        "",
        "## Targets",
        "",
        "Computed from the numbers above (a torchpool run with errors fails its target).",
        "",
        "```",
    ]
    for target in targets(results):
        lines.append(f"{'PASS' if target.passed else 'FAIL'}  {target.name}: {target.detail}")
    lines += ["```", ""]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------
