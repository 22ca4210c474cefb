"""What every policy shares: the iteration's token, sequence and page budget, and admission in a given order."""

from __future__ import annotations

import dataclasses

from tokenflow_jax.request import Request, RequestStatus
from tokenflow_jax.scheduler.interface import SchedulerState, StepPlan


@dataclasses.dataclass
class TokenBudget:
    """Tokens, sequences and free pages left for this iteration."""

    tokens: int
    seqs: int
    pages: int

    def chunk(self, state: SchedulerState, req: Request) -> tuple[int, int]:
        """(tokens to compute, extra pages needed) if `req` runs now with what is left."""
        n = min(req.num_uncomputed, self.tokens)
        return n, state.extra_pages_for(req, n) if n > 0 else 0

    def take(self, plan: StepPlan, req: Request, n: int, pages: int) -> None:
        if req.status is RequestStatus.PAUSED and req.request_id not in plan.swap_in:  # KV comes back first
            plan.swap_in.append(req.request_id)
        plan.schedule[req.request_id] = n
        self.tokens -= n
        self.seqs -= 1
        self.pages -= pages


def budget_for(state: SchedulerState) -> TokenBudget:
    ex = state.executor
    return TokenBudget(ex.max_batch_tokens, ex.max_num_seqs, ex.free_device_pages())


def admission_queue(state: SchedulerState) -> list[Request]:
    """Paused (swapped-out) and waiting requests in arrival order: baselines resume the former like they admit
    the latter, so a policy run with `preemption="swap"` never strands a request in the host tier."""
    return sorted([*state.paused, *state.waiting], key=lambda r: (r.arrival, r.request_id))


def admit_in_order(state: SchedulerState, plan: StepPlan, budget: TokenBudget, candidates: list[Request]) -> None:
    """Admit waiting requests in the given order while tokens, sequences and pages last (stop at the first
    that does not fit, so order is kept)."""
    for req in candidates:
        if budget.seqs <= 0 or budget.tokens <= 0:
            return
        n, pages = budget.chunk(state, req)
        if n <= 0 or pages > budget.pages:
            return
        budget.take(plan, req, n, pages)


def write_through_order(state: SchedulerState, plan: StepPlan, min_unread: dict[str, float] | None = None) -> list[str]:
    """The scheduled requests largest unread buffer first (the likeliest to be paused next), ties in schedule
    order: the order a plan asks the executor to copy new KV to the host in. With `min_unread`, only those
    holding at least that many unread tokens (a request it does not name: any)."""
    scheduled = list(plan.schedule)
    unread = state.tracker.buffer_tokens_of(scheduled, state.now)
    order = sorted(range(len(scheduled)), key=unread.__getitem__, reverse=True)
    if min_unread is not None:
        order = [i for i in order if unread[i] >= min_unread.get(scheduled[i], 0.0)]
    return list(map(scheduled.__getitem__, order))
