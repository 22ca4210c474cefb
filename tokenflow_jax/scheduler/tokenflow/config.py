"""`TokenFlowConfig`: the policy's hyperparameters (docs/DESIGN.md section 3.14)."""

from __future__ import annotations

import dataclasses
import math

from tokenflow_jax.scheduler.rateless import DEFAULT_MAX_HOLD_S, check_max_hold


@dataclasses.dataclass(frozen=True)
class TokenFlowConfig:
    """Hyperparameters, with the defaults the paper found to work."""

    reschedule_interval: float = 0.5  # s between rebalances under stress (shorter was marginally better)
    mu: float = 1.5  # buffer conservativeness >= 1: high behaves like fcfs, low is agile but risks stutter
    gamma: float = 1.0  # weight of buffer urgency phi(b) in U = v t - gamma phi(b); 0 balances by value alone
    adaptation_rate: float = 0.2  # lambda: pull of the working set W toward the current running count
    critical_buffer_s: float = 0.5  # a streaming request with less buffer than this signals stress
    resume_margin_s: float = 0.25  # resume a paused stream this long (plus its load time) before it runs dry
    local_search_iters: int = 4  # adjacent swaps tried after the greedy fill
    stickiness_s: float = 1.0  # running requests sort as if their buffer were this much smaller (less churn)
    io_fraction: float = 0.05  # loads of streams not due back a decision plans: this share of an interval
    capacity_hysteresis: float = 0.9  # an overload clears below this x Gamma; below it newcomers may enter after a dip
    overload_clear_s: float = 1.0  # ... Gamma the lowest of the decisions of this many seconds back
    overload_fcfs_order: bool = True  # overloaded: equal urgency and value go by fcfs's order (arrival, then id)
    overload_entry_fraction: float = 0.1  # overloaded: newcomers enter this x playback before the overload ends
    overload_entry_share: float = 0.8  # ... or while buffers and this x Gamma feed them within that (0: never)
    deep_buffer_fraction: float = 0.05  # overloaded: room the started streams will need back is lent to newcomers
    # while the started streams' median buffer is at least this x their median playback (or a hold costs more)
    wait_beyond_room: bool = True  # beyond room, newcomers whose room opens late wait outside the decision
    room_wait_fraction: float = 0.1  # ... unless room opens within this x the first one's playback
    max_hold_s: float = DEFAULT_MAX_HOLD_S  # a rate-less request this long without a token runs (to its next token)
    rateless_step_fraction: float = 0.95  # rate-less requests join a step while it takes <= this x a reader's period
    rotation_share: float = 0.25  # where swaps stretch the steps (CPU), a pause buys its copies' time / this share

    def __post_init__(self) -> None:
        if not self.reschedule_interval > 0:
            raise ValueError(f"reschedule_interval must be > 0 s, got {self.reschedule_interval!r}")
        if not self.mu >= 1.0:
            raise ValueError(f"mu (buffer conservativeness) must be >= 1, got {self.mu!r}")
        if not 0.0 <= self.adaptation_rate <= 1.0:
            raise ValueError(f"adaptation_rate (lambda) must be in [0, 1], got {self.adaptation_rate!r}")
        if not 0.0 <= self.overload_entry_share <= 1.0:
            raise ValueError(f"overload_entry_share must be in [0, 1], got {self.overload_entry_share!r}")
        if not 0.0 < self.capacity_hysteresis <= 1.0:
            raise ValueError(f"capacity_hysteresis must be in (0, 1], got {self.capacity_hysteresis!r}")
        check_max_hold(self.max_hold_s)
        if not 0 < self.rotation_share < math.inf:
            raise ValueError(f"rotation_share must be a finite number > 0, got {self.rotation_share!r}")
        if not 0 < self.rateless_step_fraction < math.inf:
            raise ValueError(f"rateless_step_fraction must be a finite number > 0, got {self.rateless_step_fraction!r}")
        nonnegative = ("gamma", "critical_buffer_s", "resume_margin_s", "local_search_iters", "stickiness_s",
                       "io_fraction", "overload_entry_fraction", "deep_buffer_fraction", "room_wait_fraction",
                       "overload_clear_s")  # fmt: skip
        for name in nonnegative:
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
