"""The streaming reader (docs/DESIGN.md section 2), in one place: when it reads each token, how long it waits,
and what a token is worth given the unread buffer in front of it.

    read_1 = g_1;   read_j = max(g_j, read_{j-1} + 1/r);   stall_j = max(0, g_j - (read_{j-1} + 1/r))
    w_j = 1 if B_j <= tau1; (tau2 - B_j) / (tau2 - tau1) between; 0 if B_j >= tau2   (tau = 0.1 L, 0.2 L)

Metrics, the live tracker, the server's pacing and the TokenFlow policy all use these, so a token's read time
and weight are the same floats wherever they are computed.
"""

from __future__ import annotations

import numpy as np

# Buffer thresholds as fractions of the request's output length L.
TAU1_FRACTION = 0.10
TAU2_FRACTION = 0.20


def read_due(previous_read: float, period: float) -> float:
    """When the reader wants the next token: one period (1/r) after it read the previous one."""
    return previous_read + period


def next_read(previous_read: float | None, generated: float, period: float) -> float:
    """read_j: the reader reads a token when it is due, never before it exists (the first when it exists)."""
    return generated if previous_read is None else max(generated, previous_read + period)


def negative_token_weights(unread: np.ndarray, output_len: np.ndarray | float) -> np.ndarray:
    """-w for unread buffers B (floats; a new array): the order an ascending sort wants, in few array operations.
    Exactly the negated weights: (B - tau2) / (tau2 - tau1) clipped to [-1, 0]."""
    tau2 = TAU2_FRACTION * output_len
    ramp = unread - tau2
    ramp /= tau2 - TAU1_FRACTION * output_len  # <= -1 at tau1, >= 0 at tau2
    return np.maximum(np.minimum(ramp, 0.0, out=ramp), -1.0, out=ramp)


def token_weights(unread: np.ndarray, output_len: np.ndarray | float) -> np.ndarray:
    """w for unread buffers B (tokens) of streams of output length L (per buffer, or one for all)."""
    weights = np.negative(negative_token_weights(np.asarray(unread, dtype=np.float64), output_len))
    weights += 0.0  # -0.0 (from negating a clipped 0) reads as 0.0
    return weights
