"""`andes`: the QoE-aware baseline of Andes (Liu et al. 2024), preempting by recompute.

Every `interval` iterations Andes picks who runs by a knapsack over the device pages and `max_num_seqs`,
solved greedily by QoE gain per page of context: a request's gain is the share of its expected delivery that
is lost if it is not served over the next `horizon_s`. A started request loses what its reader would miss
once the client buffer runs dry; a waiting one loses from its expected first-token time
(arrival + `ttft_expected_s`) on, so its gain grows with its wait. Running requests left out of the knapsack
are preempted by recompute, but no request more than `max_preemptions` times (Andes caps preemption
frequency: under recompute each one re-pays the prefill, and an uncapped knapsack thrashes). Between decisions
only free memory is handed out, in the same priority order. A rate-less request has no delivery to lose: its
gain is 0 (it runs on what the readers leave) until it has gone `max_hold_s` without a token, then it outranks
every stream.
"""

from __future__ import annotations

import dataclasses
import math

from tokenflow_jax.kv.pages import pages_for
from tokenflow_jax.metrics import DEFAULT_TTFT_EXPECTED_S
from tokenflow_jax.request import Request, RequestStatus
from tokenflow_jax.scheduler.budget import admission_queue, admit_in_order, budget_for, write_through_order
from tokenflow_jax.scheduler.interface import SchedulerState, StepPlan
from tokenflow_jax.scheduler.rateless import DEFAULT_MAX_HOLD_S, check_max_hold


@dataclasses.dataclass
class AndesPolicy:
    interval: int = 1  # iterations between knapsack decisions (preemptions happen only then)
    horizon_s: float = 1.0  # how far ahead a decision looks
    ttft_expected_s: float = DEFAULT_TTFT_EXPECTED_S
    max_preemptions: int = 1  # per request; a request preempted this often keeps its place until it finishes
    max_hold_s: float = DEFAULT_MAX_HOLD_S  # a rate-less request this long without a token outranks the streams
    name: str = dataclasses.field(default="andes", init=False)
    uses_write_through: bool = dataclasses.field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.interval < 1 or self.horizon_s <= 0 or self.ttft_expected_s < 0 or self.max_preemptions < 0:
            raise ValueError("need interval >= 1, horizon_s > 0, ttft_expected_s >= 0 and max_preemptions >= 0")
        check_max_hold(self.max_hold_s)
        self._iteration = 0

    # ---- QoE gain and size
    def gain(self, state: SchedulerState, req: Request) -> float:
        """Expected tokens the reader misses over the horizon if `req` is not served, per output token."""
        buf = state.tracker[req.request_id]
        if req.rate is None:  # no reader: nothing lost, until held too long
            held_since = buf.last_read_time if buf.num_generated else req.arrival  # read when made
            running = req.status is RequestStatus.RUNNING
            return math.inf if not running and state.now - held_since >= self.max_hold_s else 0.0
        if buf.num_generated:
            slack = buf.time_until_dry(state.now)
        else:
            slack = req.arrival + self.ttft_expected_s - state.now  # negative once the first token is late
        missed = req.rate * max(0.0, self.horizon_s - slack)
        return missed / max(req.sampling.max_tokens, 1)

    def pages(self, state: SchedulerState, req: Request) -> int:
        """Device pages `req` holds once its next step runs (a waiting request recomputes its whole context)."""
        if req.status is RequestStatus.RUNNING:
            return len(req.device_pages) + state.extra_pages_for(req, 1)
        return pages_for(req.num_tokens, state.executor.page_size)

    # ---- decision
    def select(self, state: SchedulerState) -> list[Request]:
        """The knapsack: highest gain per page first, while pages and sequence slots last. Running requests that
        reached the preemption cap go in first, as long as memory holds them."""
        ex = state.executor
        # (a page running requests share counts once)
        capacity = ex.free_device_pages() + len({p for r in state.running for p in r.device_pages})
        chosen: list[Request] = []
        for req in state.running:  # admission order: if memory runs out even for these, the latest yield
            size = self.pages(state, req)
            capped = req.preemptions_recompute + req.preemptions_swap >= self.max_preemptions
            if capped and len(chosen) < ex.max_num_seqs and size <= capacity:
                chosen.append(req)
                capacity -= size
        candidates = [r for r in state.running if r not in chosen] + admission_queue(state)
        # Ties (e.g. all buffers comfortable) keep running requests and arrival order: no needless churn.
        candidates.sort(key=lambda r: (-self.gain(state, r) / max(self.pages(state, r), 1),
                                       r.status is not RequestStatus.RUNNING, r.arrival))  # fmt: skip
        for req in candidates:
            size = self.pages(state, req)
            if len(chosen) < ex.max_num_seqs and size <= capacity:
                chosen.append(req)
                capacity -= size
        return chosen

    def plan(self, state: SchedulerState) -> StepPlan:
        decide = self._iteration % self.interval == 0
        self._iteration += 1
        plan = StepPlan()
        budget = budget_for(state)
        if decide:
            chosen = self.select(state)
            keep = {r.request_id for r in chosen}
            for req in state.running:
                if req.request_id not in keep:
                    plan.recompute_out.append(req.request_id)
                    budget.pages += state.pages_freed_by(req)
            admit = [r for r in chosen if r.status is not RequestStatus.RUNNING]
        else:
            admit = sorted(admission_queue(state), key=lambda r: -self.gain(state, r) / max(self.pages(state, r), 1))
        gone = set(plan.recompute_out)
        for req in state.running:
            if req.request_id in gone:
                continue
            n, pages = budget.chunk(state, req)
            if n > 0 and budget.seqs > 0 and pages <= budget.pages:
                budget.take(plan, req, n, pages)
        admit_in_order(state, plan, budget, admit)
        plan.sync_order = write_through_order(state, plan)
        return plan
