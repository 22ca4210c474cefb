"""Rate-less requests in the step (docs/DESIGN.md section 3.16): they share a decode step with the streams only
while it stays within the fastest stream's reader's period.

The policy plans as fcfs where the batch with the rate-less requests counted is hopeless (section 3.13); a decode
step costs every sequence in it, so each rate-less request that runs slows every stream beside it. Where the
streams alone step faster than their fastest reader reads, the rate-less requests take the room left
(`step_fraction` of that period), those furthest from done first (the answer with the most steps left bounds
when the batch ends), and the rest sit the step out with their KV in place; one held `max_hold_s` since its last
token (or arrival) is stepped regardless. Where the streams alone already outpace their readers no order keeps
them fed and nothing is left out: the plan stays fcfs's."""

from __future__ import annotations

from collections.abc import Sequence

from tokenflow_jax.request import Request
from tokenflow_jax.scheduler.interface import CostEstimates, SchedulerState, StepPlan

Chunk = tuple[Request, int]  # a request and the tokens it computes in the step


def chunk_cost_s(est: CostEstimates, req: Request, n: int) -> tuple[int, float]:
    """(context tokens, prefill seconds) one chunk of `n` tokens adds to a step."""
    return req.num_computed + n, (n - 1) * est.prefill_per_token_s if n > 1 else 0.0


def held_back(state: SchedulerState, req: Request, max_hold_s: float) -> bool:
    """Whether a rate-less request has gone `max_hold_s` without a token (since its last one, or its arrival)."""
    last = state.tracker[req.request_id].last_read_time  # a rate-less reader reads each token when it is made
    return state.now - (req.arrival if last is None else last) >= max_hold_s


def sitting_out(
    chunks: Sequence[Chunk], state: SchedulerState, est: CostEstimates, max_hold_s: float, step_fraction: float
) -> list[str]:
    """The rate-less requests among a step's `chunks` that sit it out, so that the step stays within
    `step_fraction` of the fastest stream's period; in the order they were weighed (furthest from done first)."""
    if est.decode_step_model is None:
        return []
    streams = [(r, n) for r, n in chunks if r.rate is not None]
    rateless = [(r, n) for r, n in chunks if r.rate is None]
    if not streams or not rateless:
        return []
    _, per_seq, per_context = est.decode_step_model
    cap_s = step_fraction / max(r.rate for r, _ in streams)
    context, prefill_s = 0, 0.0
    for r, n in streams:
        c, p = chunk_cost_s(est, r, n)
        context, prefill_s = context + c, prefill_s + p
    step_s = est.decode_step_at(len(streams), context) + prefill_s
    if step_s > cap_s:  # the streams alone outpace their readers: leaving anyone out would not feed them
        return []

    # Held back `max_hold_s` first, then the most tokens left (`max_tokens` bounds them), then arrival.
    tiers = [0 if held_back(state, r, max_hold_s) else 1 for r, _ in rateless]
    weighed = sorted(
        (tier, len(r.output_ids) - r.sampling.max_tokens, r.arrival, r.request_id, n)
        for tier, (r, n) in zip(tiers, rateless, strict=True)
    )
    by_id = {r.request_id: r for r, _ in rateless}
    left_out = []
    for tier, _, _, rid, n in weighed:
        c, p = chunk_cost_s(est, by_id[rid], n)
        extra_s = per_seq + per_context * c + p
        if step_s + extra_s <= cap_s or tier == 0:  # tier 0: held back, stepped regardless
            step_s += extra_s
        else:
            left_out.append(rid)
    return left_out


def running_chunks(state: SchedulerState) -> list[Chunk]:
    """The running requests as a step would take them before any admission: each computes what it has not."""
    return [(r, r.num_uncomputed) for r in state.running if r.num_uncomputed > 0]


def planned_chunks(plan: StepPlan, state: SchedulerState) -> list[Chunk]:
    by_id = {r.request_id: r for r in (*state.running, *state.paused, *state.waiting)}
    return [(by_id[rid], n) for rid, n in plan.schedule.items()]


def slots_short(plan: StepPlan, state: SchedulerState) -> int:
    """How many sequence slots beyond the executor's `plan` fills: the running requests it does not pause plus
    those it starts or loads."""
    running = {r.request_id for r in state.running}
    entering = len(set(plan.schedule).union(plan.swap_in).difference(running))
    staying = len(running) - len(plan.swap_out) - len(plan.recompute_out)
    return max(0, staying + entering - state.executor.max_num_seqs)


def leave_out(plan: StepPlan, rids: Sequence[str]) -> None:
    """Drop `rids` from this step; a paused one is not loaded for it either."""
    for rid in rids:
        del plan.schedule[rid]
        if rid in plan.swap_in:
            plan.swap_in.remove(rid)
    if rids and plan.sync_order:
        gone = set(rids)
        plan.sync_order = [rid for rid in plan.sync_order if rid not in gone]
