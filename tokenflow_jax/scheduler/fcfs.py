"""`fcfs`: the vLLM V1-like baseline.

Running requests first, in admission order; then admit waiting requests in arrival order while pages allow.
When a running request needs a page and none is free, the most recently admitted request is preempted by
recompute. No proactive preemption. A rate-less request is treated as any other (`max_hold_s` is accepted, like
every policy's, and has nothing to bound: fcfs holds no request back beyond memory).
"""

from __future__ import annotations

from tokenflow_jax.request import Request
from tokenflow_jax.scheduler.budget import admission_queue, admit_in_order, budget_for, write_through_order
from tokenflow_jax.scheduler.interface import SchedulerState, StepPlan
from tokenflow_jax.scheduler.rateless import DEFAULT_MAX_HOLD_S, check_max_hold


class FCFSPolicy:
    name = "fcfs"
    uses_write_through = False

    def __init__(self, max_hold_s: float = DEFAULT_MAX_HOLD_S) -> None:
        self.max_hold_s = check_max_hold(max_hold_s)

    def plan(self, state: SchedulerState) -> StepPlan:
        plan = StepPlan()
        budget = budget_for(state)
        running = list(state.running)
        preempted = False
        i = 0
        while i < len(running):
            req = running[i]
            n, pages = budget.chunk(state, req)
            if n <= 0 or budget.seqs <= 0:
                i += 1
                continue
            while pages > budget.pages and running[-1] is not req:
                victim = running.pop()  # latest admitted goes first
                plan.recompute_out.append(victim.request_id)
                budget.pages += state.pages_freed_by(victim)
                preempted = True
            if pages > budget.pages:
                plan.recompute_out.append(req.request_id)
                running.pop(i)
                budget.pages += state.pages_freed_by(req)
                preempted = True
                continue
            budget.take(plan, req, n, pages)
            i += 1
        if not preempted:
            admit_in_order(state, plan, budget, self.queue(state))
        plan.sync_order = write_through_order(state, plan)
        return plan

    def queue(self, state: SchedulerState) -> list[Request]:
        """The paused and waiting requests in the order they are admitted: arrival."""
        return admission_queue(state)
