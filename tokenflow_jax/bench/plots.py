"""Plots of a scheduler comparison (PNG): client buffers over time, TTFT CDF, effective vs token throughput.

Every plotted number comes from `metrics` (read times, TTFTs, throughputs); this module only draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from tokenflow_jax.bench.results import SchedulerRun
from tokenflow_jax.metrics import read_times


def buffer_curve(token_times: Sequence[float], rate: float) -> tuple[np.ndarray, np.ndarray]:
    """(times, unread tokens) of a client buffer as a step curve: generated minus read, at every event."""
    gen = np.asarray(token_times, dtype=np.float64)
    reads = read_times(gen, rate)
    events = np.union1d(gen, reads)
    unread = np.searchsorted(gen, events, side="right") - np.searchsorted(reads, events, side="right")
    return events, unread


def plot_buffers(runs: Sequence[SchedulerRun], ax_row: Sequence[Axes]) -> None:
    for run, ax in zip(runs, ax_row, strict=True):
        for record in run.records:
            if record.completed:
                t, unread = buffer_curve(record.token_times, record.rate)
                ax.step(t - run.start, unread, where="post", lw=0.7, alpha=0.6)
        ax.set_title(run.name)
        ax.set_xlabel("time since first arrival (s)")
    ax_row[0].set_ylabel("client buffer (unread tokens)")


def plot_ttft_cdf(runs: Sequence[SchedulerRun], ax: Axes) -> None:
    for run in runs:
        ttfts = np.sort(run.summary["ttfts"])
        if ttfts.size:
            ax.step(ttfts, np.arange(1, ttfts.size + 1) / ttfts.size, where="post", label=run.name)
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()


def plot_throughput(runs: Sequence[SchedulerRun], ax: Axes) -> None:
    x = np.arange(len(runs))
    ax.bar(x - 0.2, [r.summary["output_throughput"] for r in runs], 0.4, label="token throughput")
    ax.bar(x + 0.2, [r.summary["effective_throughput"] for r in runs], 0.4, label="effective throughput")
    ax.set_xticks(x, [r.name for r in runs])
    ax.set_ylabel("tokens/s")
    ax.legend()


def save_plots(runs: Sequence[SchedulerRun], out: str | Path) -> list[Path]:
    """buffers.png, ttft_cdf.png and throughput.png in `out`; returns their paths."""
    out = Path(out)
    paths = [out / "buffers.png", out / "ttft_cdf.png", out / "throughput.png"]
    # Figure objects without pyplot: no backend or display involved, nothing left open.
    fig = Figure(figsize=(4.5 * len(runs), 3.6))
    plot_buffers(runs, fig.subplots(1, len(runs), sharey=True, squeeze=False)[0])
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    for path, draw in zip(paths[1:], (plot_ttft_cdf, plot_throughput), strict=True):
        fig = Figure(figsize=(5.5, 3.8))
        draw(runs, fig.subplots())
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    return paths
