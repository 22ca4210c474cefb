"""Running estimates of noisy timings: a moving average that can ease slower than it rises, and a decaying peak.
The executors' cost estimates, the server's delivery lag and the policy's resume delay are built on them."""

from __future__ import annotations

import collections


class DecayingPeak:
    """A recent peak: rises to a larger sample at once, decays toward smaller ones by `decay` of the gap per
    sample, so what is built on it covers the swings of the last tens of samples."""

    def __init__(self, decay: float = 0.02) -> None:
        self.decay = decay
        self.value = 0.0

    def add(self, x: float) -> float:
        self.value = x if x > self.value else self.value + self.decay * (x - self.value)
        return self.value


class MovingAverage:
    """Exponential moving average; with `weight_down`, a sample below the average pulls with that weight instead
    (a cost that rises at once and eases slowly reads noisy timings on their slow side)."""

    def __init__(self, initial: float, weight: float = 0.2, weight_down: float | None = None) -> None:
        self.value, self.weight = initial, weight
        self.weight_down = weight if weight_down is None else weight_down

    def update(self, x: float) -> float:
        self.value += (self.weight if x >= self.value else self.weight_down) * (x - self.value)
        return self.value


class PerPageCost:
    """What each page moved adds to a step: the slope of a step's time beyond its predicted compute against the
    pages moved during it, fitted over the last `window` steps (swap-free ones included). Whatever lands on
    every step alike (a host's jitter, a server taking requests) goes to the intercept, not to the pages; with no
    spread in the pages yet, the last slope stands (0 at first)."""

    def __init__(self, window: int = 256) -> None:
        self._samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=window)
        self._sums = [0.0, 0.0, 0.0, 0.0]  # pages, excess, pages^2, pages x excess over the window
        self.value = 0.0

    def add(self, pages: float, excess_s: float) -> float:
        sums = self._sums
        if len(self._samples) == self._samples.maxlen:
            old_pages, old_excess = self._samples[0]
            sums[0] -= old_pages
            sums[1] -= old_excess
            sums[2] -= old_pages * old_pages
            sums[3] -= old_pages * old_excess
        self._samples.append((pages, excess_s))
        sums[0] += pages
        sums[1] += excess_s
        sums[2] += pages * pages
        sums[3] += pages * excess_s
        n = len(self._samples)
        spread = sums[2] - sums[0] * sums[0] / n
        if spread > 1e-9 * max(sums[2], 1.0):
            self.value = max((sums[3] - sums[0] * sums[1] / n) / spread, 0.0)
        return self.value
