"""`DecodeStepModel`: the decode step's time as a function of the batch (sequences, context tokens), fitted to
measured steps, and the machine's speed against that fit; what a policy predicts Gamma with."""

from __future__ import annotations

import collections
import itertools
import math

import numpy as np

from tokenflow_jax.estimators import MovingAverage

# The subsets of the step model's terms (intercept, per sequence, per context token) a non-negative fit tries.
NNLS_SUBSETS = [list(t) for k in (3, 2, 1) for t in itertools.combinations(range(3), k)]


class DecodeStepModel:
    """Non-negative least-squares fit of decode step time to (sequences, context tokens) over recent steps, so a
    policy can predict the step, and so the decode capacity Gamma, at contexts the batch has not reached yet.

    The fit looks back `window` steps; the machine's speed (contention, clocks, long prefills beside the batch)
    changes faster than that. `speed` follows it within a few steps: a moving average of measured over
    predicted time, which scales the coefficients a policy sees (`coefficients`)."""

    def __init__(
        self,
        window: int = 512,
        refit_every: int | None = 32,
        speed_weight: float = 0.2,
        fitted: tuple[float, float, float] | None = None,
    ) -> None:
        """`fitted`: coefficients known beforehand; with `refit_every` None they are kept (only the speed moves)."""
        self.samples: collections.deque[tuple[int, int, float]] = collections.deque(maxlen=window)
        self.refit_every = refit_every
        self.fitted = fitted
        # Slower at once, faster slowly: a noisy host's momentarily fast steps must not promise capacity (each
        # promise starts streams that a slower step then cannot feed).
        self.speed = MovingAverage(1.0, speed_weight, speed_weight / 4)
        self._since_fit = 0

    @property
    def coefficients(self) -> tuple[float, float, float] | None:
        if self.fitted is None:
            return None
        slowdown = self.speed.value
        return self.fitted[0] * slowdown, self.fitted[1] * slowdown, self.fitted[2] * slowdown

    def predict(self, num_seqs: int, context_tokens: int) -> float | None:
        if self.fitted is None:
            return None
        base, per_seq, per_context = self.fitted
        return base + per_seq * num_seqs + per_context * context_tokens

    def predict_now(self, num_seqs: int, context_tokens: int) -> float | None:
        """`predict` at the machine's current speed (the step a policy expects)."""
        predicted = self.predict(num_seqs, context_tokens)
        return None if predicted is None else predicted * self.speed.value

    def add(self, num_seqs: int, context_tokens: int, seconds: float) -> None:
        self.samples.append((num_seqs, context_tokens, seconds))
        predicted = self.predict(num_seqs, context_tokens)
        if predicted is not None and predicted > 0:
            self.speed.update(seconds / predicted)
        self._since_fit += 1
        if self.refit_every is None:
            return
        if self._since_fit >= self.refit_every and len(self.samples) >= 2 * self.refit_every:
            self._since_fit = 0
            fitted = self.fit(list(self.samples))
            if fitted is not None:
                # A refit keeps the speed: the new fit averages older speeds in, and the speed moves on from here.
                first, self.fitted = self.fitted is None, fitted
                if first:
                    self._replay_speed()

    def _replay_speed(self) -> None:
        """The speed as if the first fit had been there from the first step. Until then it measured nothing (it
        stayed 1.0), and that fit averages in a burst's first, slower steps: taken at 1.0 it predicted 2-3x the
        steps of the moment, and the policy saw an overload the machine did not have (docs/DESIGN.md 3.15)."""
        for seqs, context, seconds in self.samples:
            predicted = self.predict(seqs, context)
            if predicted is not None and predicted > 0:
                self.speed.update(seconds / predicted)

    @staticmethod
    def fit(samples: list[tuple[int, int, float]]) -> tuple[float, float, float] | None:
        """Non-negative least squares: of the fits over each subset of the three terms whose coefficients are all
        >= 0, the closest (exact for three terms). Clipping an unconstrained fit's negative slopes to 0 instead kept
        an intercept fitted against them: a burst's first fit went from 9.2 ms - 92 us per sequence to a flat
        9.2 ms, for steps of 1.6 ms (docs/DESIGN.md 3.15)."""
        x = np.array([[1.0, b, c] for b, c, _ in samples])
        y = np.array([t for _, _, t in samples])
        if np.linalg.matrix_rank(x) < 3:
            return None  # all steps alike so far: nothing to extrapolate from
        best, best_error = np.zeros(3), math.inf
        for terms in NNLS_SUBSETS:
            coef = np.linalg.lstsq(x[:, terms], y, rcond=None)[0]
            if (coef < 0).any():
                continue
            error = float(np.square(x[:, terms] @ coef - y).sum())
            if error < best_error:
                best[:], best_error = 0.0, error
                best[terms] = coef
        return float(best[0]), float(best[1]), float(best[2])
