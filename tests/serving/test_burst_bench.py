"""The burst bench's tables over several rounds, against numpy's median, min and max."""

from __future__ import annotations

import numpy as np
import pytest

from serving.burst_bench import COLUMNS, main, rounds_table, spread


@pytest.mark.parametrize("count", [1, 2, 3, 6])
def test_spread_is_the_median_min_and_max(count):
    values = np.random.default_rng(count).normal(1.0, 3.0, count)
    median, low, high = float(np.median(values)), float(values.min()), float(values.max())
    assert spread(list(values), 3) == f"{median:.3f} ({low:.3f}-{high:.3f})"
    assert spread(list(values), 2, signed=True) == f"{median:+.2f} ({low:+.2f}-{high:+.2f})"


def test_ratios_to_fcfs_are_taken_round_by_round():
    rng = np.random.default_rng(0)
    keys = [key for _, key in COLUMNS]
    rounds = [{policy: dict(zip(keys, rng.uniform(0.1, 5000.0, len(keys)), strict=True))
               for policy in ("tokenflow", "fcfs")} for _ in range(5)]  # fmt: skip
    lines = rounds_table("2", rounds).splitlines()
    assert lines[0] == "contention 2 (2 CPU-bound processes), median (min-max) of 5 rounds"
    cells = [c.strip() for c in lines[3].split("|")[1:-1]]
    assert cells[0] == "tokenflow"
    p99 = np.array([r["tokenflow"]["p99_ttft_ms"] for r in rounds])
    ratios = p99 / np.array([r["fcfs"]["p99_ttft_ms"] for r in rounds])
    # The median of the per-round ratios, not the ratio of the medians.
    assert cells[-2] == f"{np.median(ratios):.2f} ({ratios.min():.2f}-{ratios.max():.2f})"
    assert cells[4] == f"{np.median(p99):.1f} ({p99.min():.1f}-{p99.max():.1f})"
    extra = np.array([r["tokenflow"]["rebuffer_s"] - r["fcfs"]["rebuffer_s"] for r in rounds])
    assert cells[-1] == f"{np.median(extra):+.2f} ({extra.min():+.2f}-{extra.max():+.2f})"


def test_without_fcfs_there_are_no_ratios():
    rounds = [{"tokenflow": {key: 1.0 for _, key in COLUMNS}}] * 2
    cells = [c.strip() for c in rounds_table("0", rounds).splitlines()[3].split("|")[1:-1]]
    assert cells[-2:] == ["-", "-"]


@pytest.mark.parametrize("flags", [["--repeats", "0"], ["--contention", "-1"], ["--schedulers", ","]])
def test_bad_arguments_are_refused_before_any_server_starts(flags, capsys):
    assert main(flags) == 2
    assert "error:" in capsys.readouterr().err
