"""When the policy decides (docs/DESIGN.md sections 3.2 and 3.9): stress, the decision cadence, events, and
the deadlines of paused streams and of streams that could give way."""

from __future__ import annotations

import math
from collections.abc import Container

from tokenflow_jax.kv.pages import pages_for
from tokenflow_jax.scheduler.interface import CostEstimates, SchedulerState
from tokenflow_jax.scheduler.tokenflow.config import TokenFlowConfig


def resume_lead_s(config: TokenFlowConfig, est: CostEstimates, slack_s: float = 0.0) -> float:
    """How long before a paused reader runs dry (beyond its load time) the stream must be back: the margin, at
    least two steps as long as the recent peak step (a host that stalls now and then stalls a resume too), plus
    `slack_s` (`TokenFlowPolicy.slack_s`: the clients' delivery lag, how long call-backs take to run)."""
    return max(config.resume_margin_s, 2 * max(est.decode_step_s, est.step_peak_s)) + slack_s


class DecisionClock:
    """Whether the policy is under stress, and whether a decision is due this iteration."""

    def __init__(self, config: TokenFlowConfig) -> None:
        self.config = config
        self.last_decision = -math.inf
        self.give_way_at = math.inf  # when a kept running stream should be able to give way to a newcomer
        self._known: tuple[int, int] | None = None  # (tracker, its membership changes) at the last check
        self._critical = False  # a running stream was below the critical buffer at the last check
        self._critical_checked = -math.inf

    def stressed(self, state: SchedulerState) -> bool:
        """A waiting queue, a paused stream, or a running stream close to running dry."""
        if state.waiting or state.paused:
            return True
        if state.now >= self._critical_checked + self.config.reschedule_interval:  # at decision cadence
            self._critical_checked = state.now
            self._critical = any(
                r.rate is not None  # a rate-less reader is never short of buffer
                and state.tracker[r.request_id].num_generated
                and state.tracker[r.request_id].buffer_seconds(state.now) < self.config.critical_buffer_s
                for r in state.running
            )
        return self._critical

    def due(self, state: SchedulerState, est: CostEstimates, wanted: Container[str], slack_s: float = 0.0) -> bool:
        """On an arrival or a finish, every `reschedule_interval`, when a stream could give way, or when a paused
        stream the last decision did not call back (`wanted`) is about to run dry."""
        # An arrival or a finish: the tracker follows the live requests (a set of them per iteration cost more).
        live = (id(state.tracker), state.tracker.membership_changes)
        changed, self._known = live != self._known, live
        if changed or state.now >= min(self.last_decision + self.config.reschedule_interval, self.give_way_at):
            return True
        # A paused reader is about to run dry (within its load time and the lead) and no decision has called it
        # back yet. Paused, it gets no tokens: it runs dry at its newest token's read time (at once if none).
        lead, page_size = resume_lead_s(self.config, est, slack_s), state.executor.page_size
        tracker, now, per_page = state.tracker, state.now, est.swap_in_per_page_s
        for r in state.paused:  # (a rate-less one never runs dry; the periodic decision sees its hold bound)
            if r.request_id not in wanted and r.rate is not None:
                last_read = tracker[r.request_id].last_read_time
                if last_read is None or last_read - now <= pages_for(r.num_computed, page_size) * per_page + lead:
                    return True
        return False

    def decided(self, now: float, give_way_at: float) -> None:
        self.last_decision, self.give_way_at = now, give_way_at
