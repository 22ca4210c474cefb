"""Running estimates of noisy timings: a moving average that can ease slower than it rises, and a decaying peak.
The executors' cost estimates, the server's delivery lag and the policy's resume delay are built on them."""

from __future__ import annotations


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
