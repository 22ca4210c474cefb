"""`tokenflow`: buffer-aware preemptive scheduling (DESIGN.md section 3).

Every iteration each RUNNING request gets a decode step or its next prefill chunk, as under fcfs. Under
*stress* (a waiting queue, a paused stream, or a running stream close to running dry) the policy also decides
which requests should hold the device, at most every `reschedule_interval` and on arrivals, finishes and
resume deadlines:

1. working set: at most W = (1 - lambda) floor(M / beta) + lambda * running requests run at once, where beta
   is the KV pages a live request is expected to need (prompt + output);
2. buffer balancing: candidates (running, paused, waiting) sorted by phi(b) = exp(-b seconds) descending, then
   value (the token weight the next token would earn), then rate; device pages and sequence slots are filled
   greedily, then a few adjacent swaps are tried that let more requests run;
3. admission gate: a running request may be paused only if its buffer covers the round trip,
   b_j >= mu r_j (t_evict + t_load + t_schedule); the requests left out are those with the largest buffers;
4. schedulability: newcomers displace nobody while the working set's rates exceed the decode capacity Gamma
   (fcfs-like memory-aware admission only, until demand falls below `capacity_hysteresis` Gamma).

A paused stream is resumed once its reader would run dry within its load time plus a margin. Each preemption
picks swap (host copy, reload later) or recompute, whichever the live cost estimates say is cheaper.
"""

from __future__ import annotations

import dataclasses
import math

from tokenflow_jax.metrics import TAU1_FRACTION, TAU2_FRACTION
from tokenflow_jax.scheduler.fcfs import TokenBudget, admit_in_order, budget_for
from tokenflow_jax.scheduler.interface import CostEstimates, SchedulerState, StepPlan, pages_for
from tokenflow_jax.scheduler.request import Request, RequestStatus


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
    capacity_hysteresis: float = 0.9  # after overload, newcomers may displace others once demand < this * Gamma

    def __post_init__(self) -> None:
        if not self.reschedule_interval > 0:
            raise ValueError(f"reschedule_interval must be > 0 s, got {self.reschedule_interval!r}")
        if not self.mu >= 1.0:
            raise ValueError(f"mu (buffer conservativeness) must be >= 1, got {self.mu!r}")
        if not 0.0 <= self.adaptation_rate <= 1.0:
            raise ValueError(f"adaptation_rate (lambda) must be in [0, 1], got {self.adaptation_rate!r}")
        if not 0.0 < self.capacity_hysteresis <= 1.0:
            raise ValueError(f"capacity_hysteresis must be in (0, 1], got {self.capacity_hysteresis!r}")
        if self.gamma < 0 or self.critical_buffer_s < 0 or self.resume_margin_s < 0 or self.local_search_iters < 0:
            raise ValueError("gamma, critical_buffer_s, resume_margin_s and local_search_iters must be >= 0")


@dataclasses.dataclass
class Candidate:
    """One request as buffer balancing sees it at a decision."""

    req: Request
    buffer_tokens: int
    pages: int  # device pages it needs to run its next step
    locked: bool  # running, and its buffer cannot cover a pause: it keeps its place

    @property
    def on_device(self) -> bool:
        return self.req.status is RequestStatus.RUNNING

    def urgency(self, gamma: float) -> tuple:
        """Sort key: gamma phi(b) = gamma exp(-b seconds) descending, then value, then rate; ties keep what is
        on device, then arrival order (gamma = 0 sorts by value alone)."""
        r = self.req
        phi = gamma * math.exp(-self.buffer_tokens / r.rate)
        return (-phi, -token_value(self.buffer_tokens, r.sampling.max_tokens), -r.rate, not self.on_device, r.arrival)


def token_value(buffer_tokens: int, output_len: int) -> float:
    """Weight the next token would earn (DESIGN.md section 2): 1 below tau1, 0 above tau2, linear between."""
    tau1, tau2 = TAU1_FRACTION * output_len, TAU2_FRACTION * output_len
    if buffer_tokens <= tau1:
        return 1.0
    return 0.0 if buffer_tokens >= tau2 else (tau2 - buffer_tokens) / (tau2 - tau1)


class TokenFlowPolicy:
    name = "tokenflow"

    def __init__(self, **config: float) -> None:
        self.config = TokenFlowConfig(**config)  # an unknown key raises TypeError
        self.working_set: float | None = None  # W, set at each decision
        self.overloaded = False  # demand > Gamma: newcomers only take free room (hysteresis)
        self.decisions = 0
        self._desired: list[str] = []  # the last decision's running set, most urgent first
        self._spare_rate = math.inf  # Gamma minus the working set's demand, tok/s
        self._last_decision = -math.inf
        self._known: set[str] = set()
        self._critical = False  # a running stream was below the critical buffer at the last check
        self._critical_checked = -math.inf

    # ---- costs
    @staticmethod
    def swap_cost_s(req: Request, est: CostEstimates, page_size: int) -> float:
        """t_IO: queued transfers + evicting the tail write-through has not synced + loading every page back."""
        total = pages_for(req.num_computed, page_size)
        unsynced = total - req.num_host_synced // page_size
        return est.pending_transfer_s + unsynced * est.swap_out_per_page_s + total * est.swap_in_per_page_s

    @staticmethod
    def recompute_cost_s(req: Request, est: CostEstimates) -> float:
        return req.num_computed * est.prefill_per_token_s

    def should_swap(self, req: Request, est: CostEstimates, page_size: int, host_free: int) -> bool:
        """Reload vs recompute: swap when moving the KV is cheaper than recomputing it and host pages allow."""
        host_needed = pages_for(req.num_computed, page_size) - len(req.host_pages)
        return (req.num_computed > 0 and host_needed <= host_free
                and self.swap_cost_s(req, est, page_size) <= self.recompute_cost_s(req, est))  # fmt: skip

    def resume_lead_s(self, est: CostEstimates) -> float:
        """How long before a paused reader runs dry (beyond its load time) the stream must be back."""
        return max(self.config.resume_margin_s, 2 * est.decode_step_s)

    def pause_threshold_tokens(self, req: Request, est: CostEstimates, page_size: int, host_free: int) -> float:
        """Admission gate: a running request may pause only with b_j >= mu r_j (t_evict + t_load + t_schedule)."""
        if self.should_swap(req, est, page_size, host_free):
            round_trip = self.swap_cost_s(req, est, page_size)
        else:
            round_trip = self.recompute_cost_s(req, est)
        t_schedule = est.pending_transfer_s + self.resume_lead_s(est)
        return self.config.mu * req.rate * (round_trip + t_schedule)

    # ---- when to decide
    def is_stressed(self, state: SchedulerState) -> bool:
        if state.waiting or state.paused:
            return True
        if state.now >= self._critical_checked + self.config.reschedule_interval:  # at decision cadence
            self._critical_checked = state.now
            self._critical = any(
                state.tracker[r.request_id].num_generated
                and state.tracker[r.request_id].buffer_seconds(state.now) < self.config.critical_buffer_s
                for r in state.running
            )
        return self._critical

    def _decision_due(self, state: SchedulerState, est: CostEstimates) -> bool:
        live = {r.request_id for group in (state.waiting, state.running, state.paused) for r in group}
        changed, self._known = live != self._known, live  # an arrival or a finish
        if changed or state.now >= self._last_decision + self.config.reschedule_interval:
            return True
        lead, page_size = self.resume_lead_s(est), state.executor.page_size
        return any(
            state.tracker[r.request_id].time_until_dry(state.now)
            <= pages_for(r.num_computed, page_size) * est.swap_in_per_page_s + lead
            for r in state.paused
        )  # a paused reader is about to run dry

    # ---- the decision
    def rebalance(self, state: SchedulerState, est: CostEstimates) -> list[Request]:
        """Choose the desired running set (kept, most urgent first); return the running requests to preempt."""
        ex = state.executor
        self.decisions += 1
        self._last_decision = state.now
        host_free = ex.free_host_pages()
        cands = []
        for req in (*state.running, *state.paused, *state.waiting):
            buffer_tokens = state.tracker[req.request_id].buffer_tokens(state.now)
            locked = req.status is RequestStatus.RUNNING and (
                buffer_tokens < self.pause_threshold_tokens(req, est, ex.page_size, host_free))
            cands.append(Candidate(req, buffer_tokens, pages_for(req.num_tokens, ex.page_size), locked))
        self._adapt_working_set(state, cands)
        self._update_overload(state, est)
        gamma = self.config.gamma
        order = sorted(cands, key=lambda c: c.urgency(gamma))
        chosen = self._greedy_fill(state, order)
        self._local_search(state, order, chosen)
        self._desired = [c.req.request_id for c, keep in zip(order, chosen, strict=True) if keep]
        return [c.req for c, keep in zip(order, chosen, strict=True) if c.on_device and not keep]

    def _adapt_working_set(self, state: SchedulerState, cands: list[Candidate]) -> None:
        """W_static = floor(M / beta) with beta the expected pages per live request, pulled toward the running
        count with rate lambda."""
        page_size = state.executor.page_size
        expected = sum(pages_for(len(c.req.prompt_ids) + c.req.sampling.max_tokens, page_size) for c in cands)
        beta = max(1.0, expected / max(1, len(cands)))
        static = math.floor(state.executor.num_device_pages / beta)
        lam = self.config.adaptation_rate
        self.working_set = max(1.0, (1 - lam) * static + lam * len(state.running))

    def _update_overload(self, state: SchedulerState, est: CostEstimates) -> None:
        """Schedulability: the working set's rates against Gamma, the decode capacity at the current batch."""
        if not state.running:
            self.overloaded, self._spare_rate = False, math.inf
            return
        demand = sum(r.rate for r in (*state.running, *state.paused))
        capacity = est.decode_capacity_tok_s * len(state.running) / state.executor.max_num_seqs
        if demand > capacity:
            self.overloaded = True
        elif demand < self.config.capacity_hysteresis * capacity:
            self.overloaded = False
        self._spare_rate = capacity - demand

    def _is_blocked_newcomer(self, req: Request) -> bool:
        return self.overloaded and req.status is RequestStatus.WAITING and not req.output_ids

    def _greedy_fill(self, state: SchedulerState, order: list[Candidate]) -> list[bool]:
        """Most urgent first into sequence slots (at most W) and device pages; gate-locked streams stay."""
        ex = state.executor
        limit = min(ex.max_num_seqs, max(1, math.ceil(self.working_set or ex.max_num_seqs)))
        chosen = [c.locked for c in order]
        pages, count = sum(c.pages for c in order if c.locked), sum(chosen)
        spare_rate = self._spare_rate
        for i, c in enumerate(order):
            if c.locked or count >= limit or pages + c.pages > ex.num_device_pages:
                continue
            newcomer = c.req.status is RequestStatus.WAITING and not c.req.output_ids
            if newcomer and (self.overloaded or c.req.rate > spare_rate):
                continue  # may displace others only while the working set stays schedulable
            spare_rate -= c.req.rate if newcomer else 0.0
            chosen[i], pages, count = True, pages + c.pages, count + 1
        index = {id(c.req): i for i, c in enumerate(order)}
        for req in state.waiting:  # fcfs: newcomers take whatever room is left, in arrival order
            i = index[id(req)]
            if chosen[i]:
                continue
            if count >= limit or pages + order[i].pages > ex.num_device_pages:
                break
            chosen[i], pages, count = True, pages + order[i].pages, count + 1
        return chosen

    def _local_search(self, state: SchedulerState, order: list[Candidate], chosen: list[bool]) -> None:
        """Adjacent swaps across the boundary, kept when the pages they free let one more request run."""
        budget = state.executor.num_device_pages
        used = sum(c.pages for c, keep in zip(order, chosen, strict=True) if keep)
        for _ in range(self.config.local_search_iters):
            improved = False
            for i in range(len(order) - 1):
                a, b = order[i], order[i + 1]
                if not chosen[i] or chosen[i + 1] or a.locked or b.pages >= a.pages:
                    continue
                if self._is_blocked_newcomer(b.req):
                    continue
                room = budget - (used - a.pages + b.pages)
                extra = next((j for j in range(i + 2, len(order)) if not chosen[j] and order[j].pages <= room
                              and not self._is_blocked_newcomer(order[j].req)), None)  # fmt: skip
                if extra is not None:
                    chosen[i], chosen[i + 1], chosen[extra] = False, True, True
                    used += b.pages - a.pages + order[extra].pages
                    improved = True
                    break
            if not improved:
                return

    # ---- the iteration's plan
    def plan(self, state: SchedulerState) -> StepPlan:
        est = state.executor.estimates()
        if not self.is_stressed(state):
            self._desired = []
            return self._schedule(state, est, [], [], fcfs=True)
        victims: list[Request] = []
        if self._decision_due(state, est):
            victims = self.rebalance(state, est)
        rank = {rid: i for i, rid in enumerate(self._desired)}
        entrants = sorted((r for r in (*state.paused, *state.waiting) if r.request_id in rank),
                          key=lambda r: rank[r.request_id])  # fmt: skip
        return self._schedule(state, est, victims, entrants, fcfs=False)

    def _schedule(self, state: SchedulerState, est: CostEstimates, victims: list[Request],
                  entrants: list[Request], *, fcfs: bool) -> StepPlan:
        """Every running request steps (lowest buffer first); entrants follow in urgency order."""
        plan = StepPlan()
        budget = budget_for(state)
        host_free = [state.executor.free_host_pages()]
        for req in victims:
            self._preempt(state, plan, budget, req, est, host_free)
        gone = set(plan.swap_out)
        tracker, now = state.tracker, state.now
        # Running out of pages preempts from the end of this list: the largest buffers.
        running = sorted((r for r in state.running if r.request_id not in gone and r.request_id
                          not in plan.recompute_out), key=lambda r: tracker[r.request_id].buffer_tokens(now) / r.rate)
        i = 0
        while i < len(running):
            req = running[i]
            n, pages = budget.chunk(state, req)
            i += 1
            if n <= 0 or budget.seqs <= 0:
                continue
            while pages > budget.pages and len(running) > i:
                self._preempt(state, plan, budget, running.pop(), est, host_free)
            if pages > budget.pages:
                self._preempt(state, plan, budget, req, est, host_free)
                continue
            budget.take(plan, req, n, pages)
        for req in entrants:
            n, pages = budget.chunk(state, req)
            if budget.seqs <= 0 or n <= 0 or pages > budget.pages:
                continue
            if req.status is RequestStatus.PAUSED:
                plan.swap_in.append(req.request_id)
            budget.take(plan, req, n, pages)
        if fcfs:
            admit_in_order(state, plan, budget, list(state.waiting))
        return plan

    def _preempt(self, state: SchedulerState, plan: StepPlan, budget: TokenBudget, req: Request,
                 est: CostEstimates, host_free: list[int]) -> None:
        page_size = state.executor.page_size
        if self.should_swap(req, est, page_size, host_free[0]):
            plan.swap_out.append(req.request_id)
            host_free[0] -= max(0, pages_for(req.num_computed, page_size) - len(req.host_pages))
        else:
            plan.recompute_out.append(req.request_id)
        budget.pages += len(req.device_pages)
        if req.request_id in self._desired:
            self._desired.remove(req.request_id)
