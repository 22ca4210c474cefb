"""Rate-less requests: those that state no reader rate (agents, tool calls, batch jobs), and the bound on how long
a policy may hold one back (docs/DESIGN.md section 3.16).

Such a request is served at an adaptive rate: whatever decode capacity the streams leave spare. A policy may
hold it back (waiting, or paused with its KV on the host tier) while streams need the device, but once it has
gone `max_hold_s` without a token (since its last token, or its arrival) it is *must-run*: it ranks ahead of
every stream and is not paused for one (tokenflow keeps it so until its next token, andes for its
next step), so no wait between its tokens outlasts the bound by more than the room it waits for. Every policy takes
the option; those that never hold a request back beyond memory (fcfs, sglang) have nothing to bound.
"""

from __future__ import annotations

import math

DEFAULT_MAX_HOLD_S = 10.0


def check_max_hold(max_hold_s: float) -> float:
    """`max_hold_s` as a float, or ValueError: a finite number of seconds > 0 (an unbounded hold could starve)."""
    if isinstance(max_hold_s, bool) or not isinstance(max_hold_s, int | float) or not math.isfinite(max_hold_s):
        raise ValueError(f"max_hold_s must be a finite number of seconds > 0, got {max_hold_s!r}")
    if not max_hold_s > 0:
        raise ValueError(f"max_hold_s must be > 0 s, got {max_hold_s!r}")
    return float(max_hold_s)
