"""The running estimates the executors' costs are built on (`tokenflow_jax.estimators`), against numpy."""

import numpy as np
import pytest

from tokenflow_jax.estimators import PerPageCost


def test_per_page_cost_is_the_least_squares_slope_of_the_recent_steps():
    """Over its window the estimate is numpy's least-squares slope of the steps' excess time on their pages."""
    rng = np.random.default_rng(0)
    pages = rng.integers(0, 12, 400).astype(float) * (rng.random(400) < 0.3)  # most steps swap nothing
    excess = 4e-4 * pages + rng.gamma(1.0, 2e-3, 400)  # 0.4 ms a page under heavy-tailed jitter
    cost = PerPageCost(window=256)
    for p, e in zip(pages, excess, strict=True):
        cost.add(p, e)
    slope = np.polyfit(pages[-256:], excess[-256:], 1)[0]
    assert cost.value == pytest.approx(slope, rel=1e-6)
    assert cost.value == pytest.approx(4e-4, rel=0.5)


def test_a_slowdown_every_step_shares_is_not_read_as_the_swaps_cost():
    """A host that slows every step by 3 ms (a server taking a burst's requests, a neighbour) adds to the
    intercept: the per-page cost stays what the pages add. Read per swapping step alone (that step's excess over
    its pages), the same steps gave 1.7 ms a page: the gate's churn 8.5x what the copies cost."""
    cost = PerPageCost(window=64)
    for i in range(200):
        pages = 2.0 if i % 4 == 0 else 0.0
        cost.add(pages, 3e-3 + 2e-4 * pages)
    assert cost.value == pytest.approx(2e-4)
    per_swap_step = (3e-3 + 2e-4 * 2) / 2
    assert per_swap_step > 8 * cost.value


def test_per_page_cost_keeps_its_last_slope_until_pages_vary_and_is_never_negative():
    cost = PerPageCost(window=8)
    for _ in range(8):
        assert cost.add(0.0, 1e-3) == 0.0  # no swap yet: nothing to read
    cost.add(4.0, 1e-3 + 4 * 5e-4)
    assert cost.value == pytest.approx(5e-4)
    for _ in range(7):
        last = cost.add(3.0, 2e-3)
    assert last > 0
    assert cost.add(3.0, 2e-3) == last  # every step in the window swaps alike: no spread, the last slope stands
    for i in range(8):
        cost.add(float(i % 2), 2e-3 - 1e-3 * (i % 2))  # swapping steps faster than the rest: 0, not negative
    assert cost.value == 0.0
