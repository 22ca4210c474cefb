"""Figures with their spread: each policy run N times on one executor, reported as median (min-max), beside the
workload's bounds (`tokenflow_jax.bench.bounds`)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from tokenflow_jax.bench.bounds import Bounds, of_bound
from tokenflow_jax.bench.results import SchedulerRun

# (summary or of_bound key, header, format)
SPREAD_FIGURES = [
    ("effective_throughput", "eff tok/s", "{:.1f}"),
    ("effective_of_bound", "eff/bound", "{:.2f}"),
    ("p99_ttft_ms", "p99 TTFT ms", "{:.0f}"),
    ("p99_ttft_of_bound", "bound/p99TTFT", "{:.2f}"),
    ("output_throughput", "tok/s", "{:.1f}"),
    ("output_of_bound", "tok/bound", "{:.2f}"),
    ("mean_ttft_ms", "TTFT ms", "{:.0f}"),
    ("rebuffer_s", "rebuf s", "{:.2f}"),
    ("preemptions_swap", "swaps", "{:.0f}"),
    ("preemptions_recompute", "recomputes", "{:.0f}"),
]
# By class, where some requests state no rate (`--rate-mix ...,none:W`): the streams' and the rate-less targets.
CLASS_FIGURES = [
    ("p99_stream_ttft_ms", "stream p99 TTFT ms", "{:.0f}"),
    ("stream_rebuffer_s", "stream rebuf s", "{:.2f}"),
    ("p99_rateless_e2el_ms", "rate-less p99 E2E ms", "{:.0f}"),
]


def figures(run: SchedulerRun, bounds: Bounds | None) -> dict[str, float]:
    """The run's spread figures: its summary's and, with bounds, its fractions of them."""
    out = {k: float(run.summary[k]) for k, _, _ in SPREAD_FIGURES if k in run.summary}
    if run.summary.get("rateless_completed"):
        out.update({k: float(run.summary[k]) for k, _, _ in CLASS_FIGURES})
    if bounds is not None:
        out.update(of_bound(run.summary, bounds))
    return out


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": list(values)}


def spreads(rounds: Sequence[Sequence[SchedulerRun]], bounds: Bounds | None) -> dict[str, dict[str, dict]]:
    """{policy: {figure: {median, min, max, runs}}} over the rounds (each round runs every policy once)."""
    per_policy: dict[str, list[dict[str, float]]] = {}
    for runs in rounds:
        for run in runs:
            per_policy.setdefault(run.name, []).append(figures(run, bounds))
    return {name: {k: spread([f[k] for f in figs]) for k in figs[0]} for name, figs in per_policy.items()}


def format_spread_table(table: dict[str, dict[str, dict]], bounds: Bounds | None, repeats: int) -> str:
    """One row per policy, each figure as median (min-max) over `repeats` runs; a last row with the bounds."""
    keys = [(k, h, f) for k, h, f in SPREAD_FIGURES + CLASS_FIGURES if any(k in t for t in table.values())]
    header = ["scheduler"] + [h for _, h, _ in keys]

    def cell(s: dict[str, float], fmt: str) -> str:
        if repeats == 1:
            return fmt.format(s["median"])
        return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"

    rows = [[name] + [cell(t[k], f) if k in t else "-" for k, _, f in keys] for name, t in table.items()]
    if bounds is not None:
        limit = {
            "effective_throughput": f"<= {bounds.effective_throughput:.1f}",
            "output_throughput": f"<= {bounds.output_throughput:.1f}",
            "p99_ttft_ms": f">= {1e3 * bounds.p99_ttft_s:.0f}",
            "mean_ttft_ms": f">= {1e3 * bounds.mean_ttft_s:.0f}",
        }
        rows.append(["bound"] + [limit.get(k, "") for k, _, _ in keys])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [f"median (min-max) of {repeats} runs per scheduler" if repeats > 1 else "one run per scheduler",
             "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]  # fmt: skip
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def spread_results(table: dict[str, dict[str, dict]], bounds: Bounds | None) -> dict[str, Any]:
    """What results.json adds per scheduler: the bounds and every figure's spread."""
    return {name: {"bound": None if bounds is None else bounds.as_dict(), "spread": t} for name, t in table.items()}
